// The ceiling: the least an XDP forwarder can do on this path. Rewrites the
// Ethernet addresses and redirects through a devmap to the WAN port; no
// parsing beyond Ethernet, no lookup, no NAT.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct ceiling_cfg {
	unsigned char dmac[ETH_ALEN];
	unsigned char smac[ETH_ALEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ceiling_cfg);
} ceiling_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} ceiling_tx SEC(".maps");

SEC("xdp")
int ceiling_fwd(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 k = 0;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct ceiling_cfg *c = bpf_map_lookup_elem(&ceiling_cfg, &k);
	if (!c)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, c->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, c->smac, ETH_ALEN);
	return bpf_redirect_map(&ceiling_tx, 0, XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
