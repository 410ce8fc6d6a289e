// The TC ceiling: the least a clsact forwarder can do on this path. Rewrites
// the Ethernet addresses and redirects to the WAN port with bpf_redirect();
// no parsing beyond Ethernet, no lookup, no NAT. The counterpart of
// ceiling.bpf.c for TC offload.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct ceiling_tc_cfg {
	unsigned char dmac[ETH_ALEN];
	unsigned char smac[ETH_ALEN];
	__u32 ifindex; /* the WAN port */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ceiling_tc_cfg);
} ceiling_tc_cfg SEC(".maps");

SEC("tc")
int ceiling_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ceiling_tc_cfg *c;
	__u32 k = 0;

	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	c = bpf_map_lookup_elem(&ceiling_tc_cfg, &k);
	if (!c)
		return TC_ACT_OK;
	__builtin_memcpy(eth->h_dest, c->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, c->smac, ETH_ALEN);
	return bpf_redirect(c->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
