// Flood of new 5-tuples for the reliability campaign (bench/flood.py): run
// with BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES on a frame of
// IPv4/UDP (checksum 0), each run gives the frame the next source and
// destination port from one shared sequence and transmits it (XDP_TX), so
// every frame on the wire is a tuple the router has not seen. Both programs
// write the whole frame from flood_frame first (why: at flood_frame).
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} flood_seq SEC(".maps");

/* The frame as bench/flood.py built it (FLOOD_FRAME_LEN bytes), written
 * again at every run. Live frames come from a page pool the kernel fills
 * with the frame once per page, and a page comes back to it as its last
 * receiver left it: a frame the router's XDP rewrote in place (NAT, TTL,
 * MACs) and redirected, and the WAN host's XDP dropped, would otherwise go
 * out again as that rewrite, a tuple the router has never seen (in the 6.1
 * lane 13,314 of 48,090 frames of one burst). */
#define FLOOD_FRAME_LEN 60

struct flood_frame {
	__u8 bytes[FLOOD_FRAME_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flood_frame);
} flood_frame SEC(".maps");

static __always_inline int flood_frame_reset(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct flood_frame *f;
	__u32 k = 0;

	if (data + FLOOD_FRAME_LEN > end)
		return -1;
	f = bpf_map_lookup_elem(&flood_frame, &k);
	if (!f)
		return -1;
	__builtin_memcpy(data, f->bytes, FLOOD_FRAME_LEN);
	return 0;
}

SEC("xdp")
int flood_tx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__u32 k = 0;
	__u64 *seq, n;

	if (flood_frame_reset(ctx) || (void *)(udp + 1) > end)
		return XDP_ABORTED;
	seq = bpf_map_lookup_elem(&flood_seq, &k);
	if (!seq)
		return XDP_ABORTED;
	n = __sync_fetch_and_add(seq, 1);
	/* 2^31 tuples before one repeats: source ports 1024..65535 cycle
	 * fastest, destination ports 1..32768 after them. */
	udp->source = bpf_htons(1024 + n % 64512);
	udp->dest = bpf_htons(1 + (n / 64512) % 32768);
	return XDP_TX;
}

/* One tuple, the same frame each time: bench/drop.py's flood as frames that
 * reach the router without an skb, as from a NIC's ring. */
SEC("xdp")
int flood_same(struct xdp_md *ctx)
{
	if (flood_frame_reset(ctx))
		return XDP_ABORTED;
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
