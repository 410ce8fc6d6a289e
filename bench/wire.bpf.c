// A wire between two veths in a namespace of their own: every frame that
// arrives on one is redirected out of the other as an XDP frame, so the far
// veth's peer receives it in its NAPI without an skb, as a NIC's driver
// receives frames from its ring. wire_peer maps an ingress ifindex to the
// device on the other side.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} wire_peer SEC(".maps");

SEC("xdp")
int wire_fwd(struct xdp_md *ctx)
{
	return bpf_redirect_map(&wire_peer, ctx->ingress_ifindex, XDP_DROP);
}

char LICENSE[] SEC("license") = "GPL";
