// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * ebpf-offloader datapath: forwards established flows that the agent has
 * decided on, and hands everything else to the kernel unchanged.
 *
 * The packet walk, top to bottom:
 *   1. parse L2 (Ethernet, DSA tag, up to two VLAN tags, PPPoE session),
 *      L3 (IPv4 without options or fragments, IPv6 without extension
 *      headers) and L4 (TCP, UDP) into a flow key; anything else: pass;
 *   2. fail-safe: agent heartbeat stale or offload disabled: pass;
 *   3. flow map miss: a tuple in the early-drop map is dropped; else a
 *      pending tuple is counted and passed; else note it in the small LRU
 *      pending map, tell the agent through the ring buffer, pass;
 *   4. hit: TCP SYN/FIN/RST, TTL <= 1, over-MTU: pass (flags noted, and
 *      that the kernel saw one; last_seen is not stamped, so such a flow
 *      can idle out);
 *   5. rewrite L3/L4 (NAT with precomputed checksum deltas, TTL), rewrite
 *      the L2 header for the output device, count, stamp last_seen,
 *      redirect.
 *
 * Only uapi headers: no kernel-type relocations, so the object loads on
 * kernels without BTF (stock OpenWrt images).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "offload.h"
#include "offload_maps.h"

#ifndef ETH_P_8021AD
#define ETH_P_8021AD 0x88A8
#endif
#define PPP_IP 0x0021
#define PPP_IPV6 0x0057
#define PPPOE_HLEN 8 /* ver/type, code, session, length, PPP protocol */
/* TCP flags in byte 13 of the header (uapi TCP_FLAG_* are __be32 words). */
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define IP_MF_OFFSET 0x3fff /* MF flag and fragment offset */
#define CSUM_MANGLED_0 0xffff /* the kernel's: a UDP checksum that came out as 0 */
/* Longest L2 header we write: MACs, a 4-byte switch tag, two VLAN tags,
 * ethertype, PPPoE. */
#define L2_MAX (2 * ETH_ALEN + 4 + 8 + 2 + PPPOE_HLEN)
/* The verifier forgets the range of offsets kept on the stack; these masks
 * restate it (L3 starts by byte 38, L4 by byte 78) and change nothing. */
#define L3_OFF(p) ((p)->l3_off & 0x3f)
#define L4_OFF(p) ((p)->l4_off & 0x7f)

/* Which hook runs the shared worker (a constant at each entry point, so the
 * compiler keeps only that hook's code). */
#define OFL_HOOK_XDP 0
#define OFL_HOOK_TC 1

/* What parsing found; offsets are from the start of the frame. */
struct ofl_pkt {
	struct ofl_key key;
	__u32 l3_off;
	__u32 l4_off;
	__u32 l3_len; /* IPv4 total length, or 40 + IPv6 payload length */
	__u32 l3l4_hlen; /* IP plus TCP/UDP header length, for the GSO MTU check */
	__u8 ttl;
	__u8 tcp_flags;
	__u8 n_tags; /* VLAN tags in the frame's data */
	__u8 hw_tag; /* TC: an outer tag the kernel moved to skb metadata */
	__u8 pppoe;
	__u8 dsa; /* the frame came with a switch tag */
	__u8 no_l2; /* TC on an L3 device: the packet starts with the IP header */
	__u8 drop; /* ofl_decide(): an early drop entry matched */
	__u8 dmac[ETH_ALEN]; /* destination MAC of the frame (zero without L2) */
	__u64 now; /* bpf_ktime_get_ns() of the lookup, stamped when forwarded */
};

static __always_inline void ofl_count(__u32 stat)
{
	__u64 *c = bpf_map_lookup_elem(&ofl_stats, &stat);

	if (c)
		*c += 1;
}

/* A hit handed to the kernel: conntrack sees the packet and resets its
 * timeout (OFL_SEEN_KERNEL). Written once, not per packet. */
static __always_inline void ofl_seen_kernel(struct ofl_flow *flow)
{
	if (!(flow->seen & OFL_SEEN_KERNEL))
		flow->seen |= OFL_SEEN_KERNEL;
}

/*
 * Step 1, parsing, walks a cursor over the frame: one helper per header, each
 * checking its bounds, moving the cursor past the header and returning 0 or
 * the ofl_stat reason to pass the frame to the kernel.
 *
 * The position is an offset from `data`, not a packet pointer: the verifier
 * keeps an exact range for a small scalar across the helpers.
 */
struct ofl_cursor {
	void *data;
	void *end;
	__u32 off; /* where the next header starts */
};

/* The next `len` (a constant) bytes as a header, the cursor moved past them;
 * NULL when the frame ends first. */
static __always_inline void *ofl_cursor_take(struct ofl_cursor *c, __u32 len)
{
	void *h = c->data + c->off;

	if (h + len > c->end)
		return NULL;
	c->off += len;
	return h;
}

static __always_inline int ofl_tpid_is_vlan(__be16 tpid)
{
	return tpid == bpf_htons(ETH_P_8021Q) || tpid == bpf_htons(ETH_P_8021AD);
}

/*
 * Switch tags: every protocol's length and placement here, its bytes in
 * ofl_parse_switch_tag() (ingress) and ofl_dsa_write() (egress). The egress
 * length may depend on the frame's outer TPID (`tpid`, 0 when untagged).
 */
#define OFL_DSA_RX 0 /* from the switch's CPU port: the kernel's *_tag_rcv() */
#define OFL_DSA_TX 1 /* to it: *_tag_xmit() */

static __always_inline __u32 ofl_dsa_len(__u8 proto, int dir, __be16 tpid)
{
	switch (proto) {
	case OFL_DSA_MTK:
		/* mtk_tag_rcv() strips 4 bytes from every frame; mtk_tag_xmit()
		 * pushes nothing on a frame already tagged 802.1Q/802.1ad */
		if (dir == OFL_DSA_TX && ofl_tpid_is_vlan(tpid))
			return 0;
		return OFL_DSA_MTK_LEN;
	case OFL_DSA_QCA:
		return OFL_DSA_QCA_LEN;
	case OFL_DSA_GSWIP:
		/* gswip_tag_rcv() strips an 8-byte header, gswip_tag_xmit()
		 * pushes a 4-byte one */
		return dir == OFL_DSA_TX ? OFL_DSA_GSWIP_TX_LEN : OFL_DSA_GSWIP_RX_LEN;
	}
	return 0;
}

/* Whether the tag comes before the destination MAC instead of after the
 * source MAC. */
static __always_inline int ofl_dsa_front(__u8 proto)
{
	return proto == OFL_DSA_GSWIP;
}

/* The tag of a frame from the switch: its source port goes into the key. */
static __always_inline int ofl_parse_switch_tag(struct ofl_cursor *c, __u8 proto,
						struct ofl_pkt *p)
{
	__u8 *tag;

	switch (proto) {
	case OFL_DSA_MTK:
		/* mtk_tag_rcv(): source port in bits 2:0 of the second byte */
		tag = ofl_cursor_take(c, ofl_dsa_len(OFL_DSA_MTK, OFL_DSA_RX, 0));
		if (!tag)
			return OFL_STAT_PASS_L2;
		p->key.dsa_port = tag[1] & 0x7;
		break;
	case OFL_DSA_QCA:
		/* qca_tag_rcv(): version 2 in bits 15:14; the port in bits 2:0.
		 * Only type 0 (a normal frame) here: the kernel itself consumes
		 * management replies and MIB frames (types 1, 2). */
		tag = ofl_cursor_take(c, ofl_dsa_len(OFL_DSA_QCA, OFL_DSA_RX, 0));
		if (!tag)
			return OFL_STAT_PASS_L2;
		if ((tag[0] >> 6) != 2 || (((tag[0] << 8) | tag[1]) >> 6 & 0x1f) != 0)
			return OFL_STAT_PASS_L2;
		p->key.dsa_port = tag[1] & 0x7;
		break;
	case OFL_DSA_GSWIP:
		/* gswip_tag_rcv(): source port in bits 6:4 of byte 7 */
		tag = ofl_cursor_take(c, ofl_dsa_len(OFL_DSA_GSWIP, OFL_DSA_RX, 0));
		if (!tag)
			return OFL_STAT_PASS_L2;
		p->key.dsa_port = (tag[7] >> 4) & 0x7;
		break;
	default:
		return 0;
	}
	p->dsa = 1;
	return 0;
}

/* [switch tag] dmac smac [switch tag] ethertype. `hw_vid` is the VLAN id of
 * a tag already stripped into skb metadata (TC only, -1 if none): it is the
 * outermost. */
static __always_inline int ofl_parse_eth(struct ofl_cursor *c, __u8 dsa_proto, int hw_vid,
					 struct ofl_pkt *p, __be16 *proto)
{
	__be16 *type;
	__u8 *mac;
	int ret;

	if (hw_vid >= 0) {
		p->key.vlan_outer = hw_vid & 0xfff;
		p->hw_tag = 1;
	}
	if (ofl_dsa_front(dsa_proto)) {
		ret = ofl_parse_switch_tag(c, dsa_proto, p);
		if (ret)
			return ret;
	}
	mac = ofl_cursor_take(c, 2 * ETH_ALEN);
	if (!mac)
		return OFL_STAT_PASS_L2;
	__builtin_memcpy(p->dmac, mac, ETH_ALEN);
	if (!ofl_dsa_front(dsa_proto)) {
		ret = ofl_parse_switch_tag(c, dsa_proto, p);
		if (ret)
			return ret;
	}
	type = ofl_cursor_take(c, sizeof(*type));
	if (!type)
		return OFL_STAT_PASS_L2;
	*proto = *type;
	return 0;
}

/* Up to two 802.1Q/802.1ad tags in all, a metadata tag included; a third:
 * pass. */
static __always_inline int ofl_parse_vlans(struct ofl_cursor *c, struct ofl_pkt *p,
					   __be16 *proto)
{
	int i;

#pragma unroll
	for (i = 0; i < 2; i++) {
		__be16 *vh;

		if (!ofl_tpid_is_vlan(*proto))
			break;
		vh = ofl_cursor_take(c, 4); /* TCI, encapsulated protocol */
		if (!vh)
			return OFL_STAT_PASS_L2;
		if (p->hw_tag && i == 1)
			return OFL_STAT_PASS_L2; /* a third tag */
		if (p->hw_tag || i == 1)
			p->key.vlan_inner = bpf_ntohs(vh[0]) & 0xfff;
		else
			p->key.vlan_outer = bpf_ntohs(vh[0]) & 0xfff;
		*proto = vh[1];
		p->n_tags++;
	}
	if (ofl_tpid_is_vlan(*proto))
		return OFL_STAT_PASS_L2;
	return 0;
}

/* A PPPoE session frame carrying IPv4 or IPv6; other PPP protocols and
 * discovery frames: pass. */
static __always_inline int ofl_parse_pppoe(struct ofl_cursor *c, struct ofl_pkt *p,
					   __be16 *proto)
{
	__u8 *ph;
	__u16 ppp;

	if (*proto != bpf_htons(ETH_P_PPP_SES))
		return 0;
	ph = ofl_cursor_take(c, PPPOE_HLEN);
	if (!ph)
		return OFL_STAT_PASS_L2;
	if (ph[0] != 0x11 || ph[1] != 0) /* version 1, type 1, session data */
		return OFL_STAT_PASS_L2;
	p->key.pppoe_sid = (ph[2] << 8) | ph[3];
	ppp = (ph[6] << 8) | ph[7];
	if (ppp == PPP_IP)
		*proto = bpf_htons(ETH_P_IP);
	else if (ppp == PPP_IPV6)
		*proto = bpf_htons(ETH_P_IPV6);
	else
		return OFL_STAT_PASS_L2;
	p->pppoe = 1;
	return 0;
}

/* IPv4 without options or fragments, IPv6 (an extension header shows as a
 * next header that is not TCP/UDP: ofl_parse_l4() passes it). The whole L3
 * packet must be in the frame (`frame_len`; truncated: pass). */
static __always_inline int ofl_parse_ip(struct ofl_cursor *c, __be16 proto, __u32 frame_len,
					struct ofl_pkt *p)
{
	p->l3_off = c->off;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = ofl_cursor_take(c, sizeof(*iph));

		if (!iph || iph->version != 4)
			return OFL_STAT_PASS_L2;
		if (iph->ihl != 5) /* options: kernel */
			return OFL_STAT_PASS_L3;
		if (iph->frag_off & bpf_htons(IP_MF_OFFSET))
			return OFL_STAT_PASS_L3;
		p->l3_len = bpf_ntohs(iph->tot_len);
		if (p->l3_len < sizeof(*iph))
			return OFL_STAT_PASS_L2;
		p->key.family = OFL_AF_INET;
		p->key.proto = iph->protocol;
		p->key.saddr[0] = iph->saddr;
		p->key.daddr[0] = iph->daddr;
		p->ttl = iph->ttl;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = ofl_cursor_take(c, sizeof(*ip6));

		if (!ip6 || ip6->version != 6)
			return OFL_STAT_PASS_L2;
		p->l3_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		p->key.family = OFL_AF_INET6;
		p->key.proto = ip6->nexthdr;
		__builtin_memcpy(p->key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->key.daddr, &ip6->daddr, 16);
		p->ttl = ip6->hop_limit;
	} else {
		return OFL_STAT_PASS_L2;
	}
	if (p->l3_off + p->l3_len > frame_len)
		return OFL_STAT_PASS_L2;
	return 0;
}

/* TCP or UDP: ports, TCP flags, header lengths. */
static __always_inline int ofl_parse_l4(struct ofl_cursor *c, struct ofl_pkt *p)
{
	p->l4_off = c->off;
	if (p->key.proto == IPPROTO_TCP) {
		struct tcphdr *th = ofl_cursor_take(c, sizeof(*th));

		if (!th || th->doff < 5)
			return OFL_STAT_PASS_L2;
		p->key.sport = th->source;
		p->key.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->l3l4_hlen = p->l4_off - p->l3_off + th->doff * 4;
	} else if (p->key.proto == IPPROTO_UDP) {
		struct udphdr *uh = ofl_cursor_take(c, sizeof(*uh));

		if (!uh)
			return OFL_STAT_PASS_L2;
		p->key.sport = uh->source;
		p->key.dport = uh->dest;
		p->l3l4_hlen = p->l4_off - p->l3_off + sizeof(*uh);
	} else {
		return OFL_STAT_PASS_L3; /* not TCP/UDP, or an IPv6 extension header */
	}
	if (p->l3l4_hlen > p->l3_len)
		return OFL_STAT_PASS_L2;
	return 0;
}

/* The whole walk. `l3_proto` is set on a device without L2 header (ppp, TC
 * only): the packet starts with the IP header. */
static __always_inline int ofl_parse(void *data, void *data_end, __u32 frame_len, __u8 dsa_proto,
				     int hw_vid, __be16 l3_proto, struct ofl_pkt *p)
{
	struct ofl_cursor c = { .data = data, .end = data_end, .off = 0 };
	__be16 proto = l3_proto;
	int ret;

	__builtin_memset(p, 0, sizeof(*p));
	p->key.dsa_port = OFL_DSA_PORT_NONE;
	if (l3_proto) {
		p->no_l2 = 1;
	} else {
		ret = ofl_parse_eth(&c, dsa_proto, hw_vid, p, &proto);
		if (!ret)
			ret = ofl_parse_vlans(&c, p, &proto);
		if (!ret)
			ret = ofl_parse_pppoe(&c, p, &proto);
		if (ret)
			return ret;
	}
	ret = ofl_parse_ip(&c, proto, frame_len, p);
	if (ret)
		return ret;
	return ofl_parse_l4(&c, p);
}

static __always_inline void ofl_notify(const struct ofl_key *key, __u64 now)
{
	struct ofl_event *ev = bpf_ringbuf_reserve(&ofl_events, sizeof(*ev), 0);

	if (!ev) {
		ofl_count(OFL_STAT_EVENT_DROP);
		return;
	}
	__builtin_memcpy(&ev->key, key, sizeof(*key));
	ev->pad = 0;
	ev->ts_ns = now;
	bpf_ringbuf_submit(ev, 0);
}

/* No memcmp in BPF: six bytes compared as they are. */
static __always_inline int ofl_mac_eq(const __u8 *a, const __u8 *b)
{
	return !((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) |
		 (a[5] ^ b[5]));
}

/* An early drop entry for the tuple that has not expired: count it (the
 * entry and the reason) and return 1. Looked up only after the flow map
 * missed, so it can never hide a connection; before the pending map, as a
 * dropped tuple is never pending (the agent deletes it there when it adds
 * the drop, and a drop returns before a pending entry is made): a flood
 * packet costs two lookups, not three. */
static __always_inline int ofl_early_drop(const struct ofl_pkt *p, __u64 now)
{
	const struct ofl_key *key = &p->key;
	struct ofl_drop *d = bpf_map_lookup_elem(&ofl_drops, key);

	if (!d)
		return 0;
	if (!ofl_mac_eq(d->dmac, p->dmac))
		return 0; /* not addressed to the router: bridged, not routed */
	if ((__s64)(d->expires_ns - now) <= 0) {
		bpf_map_delete_elem(&ofl_drops, key); /* the kernel judges it again */
		return 0;
	}
	__sync_fetch_and_add(&d->packets, 1);
	__sync_fetch_and_add(&d->bytes, p->l3_len);
	ofl_count(OFL_STAT_DROP_ROUTE + (d->reason < OFL_DROP_REASONS ? d->reason : OFL_DROP_LEARNED));
	return 1;
}

/*
 * Step 3. The pending map is a small LRU apart from the flow map: a flood of
 * new tuples churns it and the ring buffer, never the offloaded flows.
 * Returns 1 when the packet is to be dropped early.
 */
static __always_inline int ofl_note_pending(const struct ofl_pkt *p, __u64 now,
					    const struct ofl_config *cfg)
{
	const struct ofl_key *key = &p->key;
	__u32 len = p->l3_len;
	struct ofl_pending fresh = {};
	struct ofl_pending *pd;

	if ((cfg->flags & OFL_CFG_DROP) && ofl_early_drop(p, now))
		return 1;
	pd = bpf_map_lookup_elem(&ofl_pending, key);
	if (pd) {
		__sync_fetch_and_add(&pd->packets, 1);
		__sync_fetch_and_add(&pd->bytes, len);
		ofl_count(OFL_STAT_PENDING);
		if (now - pd->last_notify_ns > cfg->renotify_ns) {
			pd->last_notify_ns = now;
			ofl_notify(key, now);
		}
		return 0;
	}
	fresh.first_seen_ns = now;
	fresh.last_notify_ns = now;
	fresh.packets = 1;
	fresh.bytes = len;
	if (bpf_map_update_elem(&ofl_pending, key, &fresh, BPF_NOEXIST) == 0) {
		ofl_count(OFL_STAT_NEW);
		ofl_notify(key, now);
	}
	return 0;
}

/*
 * Steps 2 to 4. Returns the flow to forward, or NULL to pass the packet (or,
 * with p->drop set, to drop it).
 * `seg_len` is the L3 length of one segment (GSO packets in TC).
 */
static __always_inline struct ofl_flow *ofl_decide(const struct ofl_config *cfg, struct ofl_pkt *p,
						   __u32 seg_len, const int hook, __u8 if_flags)
{
	struct ofl_flow *flow;
	__u64 now;

	if (!(cfg->flags & OFL_CFG_ENABLED))
		return NULL;
	now = bpf_ktime_get_ns();
	if (now - cfg->heartbeat_ns > cfg->heartbeat_timeout_ns) {
		ofl_count(OFL_STAT_PASS_STALE);
		return NULL;
	}

	flow = bpf_map_lookup_elem(&ofl_flows, &p->key);
	if (!flow) {
		/* Hybrid: XDP saw this packet first and noted it already
		 * (and dropped it, had a drop entry matched). */
		if (hook == OFL_HOOK_XDP || !(if_flags & OFL_IF_HYBRID))
			p->drop = ofl_note_pending(p, now, cfg);
		return NULL;
	}
	if (hook == OFL_HOOK_XDP && (flow->v.flags & OFL_V_TC)) {
		/* Hybrid: a TCP bulk flow, forwarded by TC once GRO has merged
		 * its segments; TC counts, stamps and checks it. */
		ofl_count(OFL_STAT_PASS_HYBRID);
		return NULL;
	}
	if (flow->state != OFL_STATE_OFFLOAD) {
		/* a flow decided as pass stays decided while its traffic lasts */
		flow->last_seen_ns = now;
		ofl_count(OFL_STAT_PASS_VERDICT);
		return NULL;
	}
	if (p->tcp_flags & (TH_FIN | TH_SYN | TH_RST)) {
		__u32 seen = 0;

		if (p->tcp_flags & TH_FIN)
			seen |= OFL_SEEN_FIN;
		if (p->tcp_flags & TH_RST)
			seen |= OFL_SEEN_RST;
		if (p->tcp_flags & TH_SYN)
			seen |= OFL_SEEN_SYN;
		flow->seen |= seen; /* a lost race only delays: the next FIN/RST sets it again */
		ofl_count(OFL_STAT_PASS_TCP_FLAGS);
		return NULL;
	}
	if (flow->seen & (OFL_SEEN_FIN | OFL_SEEN_RST)) {
		/* Closing: the kernel sees the rest of this direction until the
		 * sweep removes it, the last ACK included, so that conntrack
		 * reaches TIME_WAIT (nf_flow_table tears down on FIN likewise). */
		ofl_count(OFL_STAT_PASS_TCP_FLAGS);
		return NULL;
	}
	if (p->ttl <= 1) {
		ofl_seen_kernel(flow);
		ofl_count(OFL_STAT_PASS_TTL);
		return NULL;
	}
	if (seg_len > flow->v.mtu) {
		ofl_seen_kernel(flow);
		ofl_count(OFL_STAT_PASS_MTU);
		return NULL;
	}
	p->now = now;
	return flow;
}

/* Add a precomputed one's complement delta to a checksum field (RFC 1624
 * eqn. 3: HC' = ~(~HC + ~m + m')). Both are raw network-order memory. */
static __always_inline __u16 csum_apply(__u16 check, __u16 delta)
{
	__u32 s = (__u16)~check + (__u32)delta;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* The kernel's csum_replace_by_diff(): what bpf_l4_csum_replace() does with
 * a diff on a complete checksum. XDP applies the two L4 deltas one after the
 * other exactly like this, so that XDP and TC write the same bytes, 0x0000
 * versus 0xffff included. */
static __always_inline __u16 csum_replace_by_diff(__u16 check, __u16 diff)
{
	__u32 s = ~(__u32)check; /* ~csum_unfold() */

	s += diff;
	if (s < diff) /* csum_add(): end-around carry */
		s++;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* IPv4 addresses, TTL and header checksum; IPv6 addresses and hop limit.
 * The TTL decrement is the kernel's ip_decrease_ttl(). */
static __always_inline int ofl_rewrite_l3(void *data, void *data_end, const struct ofl_pkt *p,
					  const struct ofl_verdict *v)
{
	if (p->key.family == OFL_AF_INET) {
		struct iphdr *iph = data + L3_OFF(p);
		__u32 check;

		if ((void *)(iph + 1) > data_end)
			return -1;
		if (v->flags & OFL_V_SNAT)
			iph->saddr = v->nat_saddr[0];
		if (v->flags & OFL_V_DNAT)
			iph->daddr = v->nat_daddr[0];
		check = csum_apply(iph->check, v->csum_l3);
		check += bpf_htons(0x0100);
		iph->check = (__u16)(check + (check >= 0xffff));
		iph->ttl--;
	} else {
		struct ipv6hdr *ip6 = data + L3_OFF(p);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		if (v->flags & OFL_V_SNAT)
			__builtin_memcpy(&ip6->saddr, v->nat_saddr, 16);
		if (v->flags & OFL_V_DNAT)
			__builtin_memcpy(&ip6->daddr, v->nat_daddr, 16);
		ip6->hop_limit--;
	}
	return 0;
}

/*
 * Where the TCP/UDP checksum sits and how it changes, for both hooks (cilium's
 * csum_l4_offset_and_flags() is the model). UDP: BPF_F_MARK_MANGLED_0, the
 * kernel's rule that a checksum of 0 (none, over IPv4) stays 0 and a result
 * of 0 is sent as CSUM_MANGLED_0.
 */
struct ofl_csum_l4 {
	__u32 off; /* from the start of the L4 header */
	__u64 flags; /* for bpf_l4_csum_replace() */
};

static __always_inline struct ofl_csum_l4 ofl_csum_l4_offset_and_flags(__u8 proto)
{
	struct ofl_csum_l4 cs = { .off = offsetof(struct tcphdr, check) };

	if (proto == IPPROTO_UDP) {
		cs.off = offsetof(struct udphdr, check);
		cs.flags = BPF_F_MARK_MANGLED_0;
	}
	return cs;
}

/* What bpf_l4_csum_replace(skb, off, 0, diff, flags) does to a complete
 * checksum, for XDP, which has no such helper: XDP and TC write the same
 * bytes, 0x0000 versus 0xffff included. */
static __always_inline void ofl_csum_l4_replace(__u16 *check, __u16 diff, __u64 flags)
{
	if (!diff)
		return;
	if ((flags & BPF_F_MARK_MANGLED_0) && !*check)
		return;
	*check = csum_replace_by_diff(*check, diff);
	if ((flags & BPF_F_MARK_MANGLED_0) && !*check)
		*check = CSUM_MANGLED_0;
}

/* Ports, and (XDP, where every checksum is complete) the L4 checksum: the
 * address part, then the port part. */
static __always_inline int ofl_rewrite_l4(void *data, void *data_end, const struct ofl_pkt *p,
					  const struct ofl_verdict *v, int fix_csum)
{
	struct ofl_csum_l4 cs = ofl_csum_l4_offset_and_flags(p->key.proto);
	__be16 *ports = data + L4_OFF(p);
	__u16 *check;

	if ((void *)(ports + 2) > data_end)
		return -1;
	if (v->flags & OFL_V_SPORT)
		ports[0] = v->nat_sport;
	if (v->flags & OFL_V_DPORT)
		ports[1] = v->nat_dport;
	if (!fix_csum)
		return 0;

	check = data + L4_OFF(p) + cs.off;
	if ((void *)(check + 1) > data_end)
		return -1;
	ofl_csum_l4_replace(check, v->csum_l4_addr, cs.flags);
	ofl_csum_l4_replace(check, v->csum_l4_port, cs.flags);
	return 0;
}

/* Write the switch tag for the output port (the kernel's *_tag_xmit()) into
 * a header whose other parts are written already: mtk's tag may take the
 * place of the outer TPID. */
static __always_inline void ofl_dsa_write(__u8 *h, const struct ofl_verdict *v)
{
	__u8 bit = 1 << (v->dsa_port & 0x7);

	switch (v->dsa_proto) {
	case OFL_DSA_MTK:
		/* mtk_tag_xmit(): on a frame tagged 802.1Q or 802.1ad the tag
		 * takes the outer TPID's two bytes, (kind 1 or 2, port bitmap),
		 * and the outer TCI stays; otherwise (0, bitmap, 0, 0) is pushed */
		h[13] = bit & 0x3f;
		if (v->vlan_proto[0] == bpf_htons(ETH_P_8021Q)) {
			h[12] = 1; /* MTK_HDR_XMIT_TAGGED_TPID_8100 */
		} else if (v->vlan_proto[0] == bpf_htons(ETH_P_8021AD)) {
			h[12] = 2; /* MTK_HDR_XMIT_TAGGED_TPID_88A8 */
		} else {
			h[12] = 0; /* MTK_HDR_XMIT_UNTAGGED */
			h[14] = 0;
			h[15] = 0;
		}
		break;
	case OFL_DSA_QCA:
		/* qca_tag_xmit(): version 2, from CPU, port bitmap */
		h[12] = 0x80;
		h[13] = 0x80 | (bit & 0x7f);
		break;
	case OFL_DSA_GSWIP:
		/* gswip_tag_xmit(): source CPU, destination group ELAN, port map
		 * enabled and selected, port bitmap in bits 6:1, DPID enabled */
		h[0] = 2;
		h[1] = 0;
		h[2] = 0xc0;
		h[3] = ((bit << 1) & 0x7e) | 1;
		break;
	}
}

/* The egress L2 header's length: [switch tag] MACs [switch tag] [tags] type
 * [PPPoE]. */
static __always_inline __u32 ofl_l2_len(const struct ofl_verdict *v)
{
	__u32 len = ETH_HLEN + ofl_dsa_len(v->dsa_proto, OFL_DSA_TX, v->vlan_proto[0]);

	if (v->vlan_proto[0])
		len += 4;
	if (v->vlan_proto[1])
		len += 4;
	if (v->pppoe_sid)
		len += PPPOE_HLEN;
	return len;
}

/* Write the egress L2 header into the first ofl_l2_len(v) bytes. */
static __always_inline int ofl_write_l2(void *data, void *data_end, const struct ofl_pkt *p,
					const struct ofl_verdict *v)
{
	__u8 *h = data;
	__u32 tag_len = ofl_dsa_len(v->dsa_proto, OFL_DSA_TX, v->vlan_proto[0]);
	__u32 mac = ofl_dsa_front(v->dsa_proto) ? tag_len : 0;
	__u32 off = 2 * ETH_ALEN + tag_len;
	__be16 l3_proto = p->key.family == OFL_AF_INET ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);

	if ((void *)(h + L2_MAX) > data_end) /* an L3 header always follows */
		return -1;
	__builtin_memcpy(h + mac, v->dmac, ETH_ALEN);
	__builtin_memcpy(h + mac + ETH_ALEN, v->smac, ETH_ALEN);
	if (v->vlan_proto[0]) {
		__builtin_memcpy(h + off, &v->vlan_proto[0], 2);
		__builtin_memcpy(h + off + 2, &v->vlan_tci[0], 2);
		off += 4;
		if (v->vlan_proto[1]) {
			__builtin_memcpy(h + off, &v->vlan_proto[1], 2);
			__builtin_memcpy(h + off + 2, &v->vlan_tci[1], 2);
			off += 4;
		}
	}
	if (v->pppoe_sid) {
		__u16 plen = p->l3_len + 2; /* PPP protocol plus L3 */

		h[off] = 0x88;
		h[off + 1] = 0x64;
		h[off + 2] = 0x11;
		h[off + 3] = 0;
		h[off + 4] = v->pppoe_sid >> 8;
		h[off + 5] = v->pppoe_sid & 0xff;
		h[off + 6] = plen >> 8;
		h[off + 7] = plen & 0xff;
		h[off + 8] = 0;
		h[off + 9] = p->key.family == OFL_AF_INET ? PPP_IP : PPP_IPV6;
	} else {
		__builtin_memcpy(h + off, &l3_proto, 2);
	}
	ofl_dsa_write(h, v);
	return 0;
}

/* Count a forwarded packet and stamp last_seen for the agent's idle timeout.
 * Only here: an offloaded flow whose packets are all passed (over the MTU,
 * TTL, a hook that cannot rewrite them) must be able to idle out. */
static __always_inline void ofl_account(struct ofl_flow *flow, const struct ofl_pkt *p,
					__u32 packets)
{
	__sync_fetch_and_add(&flow->packets, packets);
	__sync_fetch_and_add(&flow->bytes, p->l3_len);
	flow->last_seen_ns = p->now;
}

/* The global settings, looked up once per packet. */
static __always_inline const struct ofl_config *ofl_config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&ofl_config, &zero);
}

/* The device's settings (DSA tag protocol, no-L2 flag); all zero for most. */
static __always_inline struct ofl_iface ofl_iface_of(const struct ofl_config *cfg, __u32 ifindex)
{
	struct ofl_iface none = {};
	struct ofl_iface *ifc;

	if (!(cfg->flags & OFL_CFG_IFACES))
		return none;
	ifc = bpf_map_lookup_elem(&ofl_ifaces, &ifindex);
	return ifc ? *ifc : none;
}

/* Step 5 in XDP: rewrite in place, move the head to the egress header's
 * length, redirect through the devmap. */
static __always_inline int ofl_xdp_forward(struct xdp_md *ctx, const struct ofl_pkt *p,
					   struct ofl_flow *flow)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	int shift;

	if (!bpf_map_lookup_elem(&ofl_tx_ports, &flow->v.oif)) {
		ofl_count(OFL_STAT_REDIRECT_FAIL);
		return XDP_PASS;
	}
	if (ofl_rewrite_l3(data, data_end, p, &flow->v) ||
	    ofl_rewrite_l4(data, data_end, p, &flow->v, 1))
		return XDP_ABORTED; /* unreachable: parse checked these bounds */

	shift = (int)p->l3_off - (int)ofl_l2_len(&flow->v);
	if (shift && bpf_xdp_adjust_head(ctx, shift))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (ofl_write_l2(data, data_end, p, &flow->v))
		return XDP_ABORTED;

	ofl_account(flow, p, 1);
	ofl_count(OFL_STAT_REDIRECT);
	return bpf_redirect_map(&ofl_tx_ports, flow->v.oif, 0);
}

/*
 * Step 5 in TC: the skb may be GSO (forwarded whole, MTU checked per segment)
 * and may carry CHECKSUM_PARTIAL, so L4 checksums go through
 * bpf_l4_csum_replace(), which knows the skb's checksum state. L2 changes go
 * through the VLAN and adjust_room helpers, which only work on an skb whose
 * protocol is IP or IPv6 once the tags are popped: PPPoE or DSA on ingress is
 * left to XDP.
 */
static __always_inline int ofl_tc_forward(struct __sk_buff *skb, const struct ofl_pkt *p,
					  struct ofl_flow *flow)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ofl_verdict v = flow->v; /* helpers below invalidate nothing of this copy */
	struct ofl_csum_l4 cs = ofl_csum_l4_offset_and_flags(p->key.proto);
	__u32 l2_extra, csum_off;
	int i;

	if (p->pppoe || p->dsa || (p->no_l2 && ofl_l2_len(&v) != ETH_HLEN) ||
	    (skb->gso_size && (v.pppoe_sid || v.dsa_proto || v.vlan_proto[0]))) {
		ofl_seen_kernel(flow);
		ofl_count(OFL_STAT_PASS_UNSUPPORTED);
		return TC_ACT_OK;
	}

	/* L3 and ports by direct access; the IPv4 header checksum is always
	 * complete, so it is updated here too. */
	if (ofl_rewrite_l3(data, data_end, p, &v) || ofl_rewrite_l4(data, data_end, p, &v, 0))
		return TC_ACT_SHOT;

	csum_off = p->l4_off + cs.off;
	if (v.csum_l4_addr &&
	    bpf_l4_csum_replace(skb, csum_off, 0, v.csum_l4_addr, cs.flags | BPF_F_PSEUDO_HDR))
		return TC_ACT_SHOT;
	if (v.csum_l4_port && bpf_l4_csum_replace(skb, csum_off, 0, v.csum_l4_port, cs.flags))
		return TC_ACT_SHOT;

	/* Down to Ethernet + L3, then grow to the egress header. */
	for (i = 0; i < 2; i++) {
		if (i >= p->n_tags + p->hw_tag)
			break;
		if (bpf_skb_vlan_pop(skb))
			return TC_ACT_SHOT;
	}
	if (p->no_l2) {
		/* The helper made for this: push a MAC header on an L3 skb. */
		if (bpf_skb_change_head(skb, ETH_HLEN, 0))
			return TC_ACT_SHOT;
	} else {
		l2_extra = ofl_l2_len(&v) - ETH_HLEN;
		if (l2_extra && bpf_skb_adjust_room(skb, l2_extra, BPF_ADJ_ROOM_MAC,
						    BPF_F_ADJ_ROOM_FIXED_GSO))
			return TC_ACT_SHOT;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (ofl_write_l2(data, data_end, p, &v))
		return TC_ACT_SHOT;

	ofl_account(flow, p, skb->gso_segs ? skb->gso_segs : 1);
	ofl_count(OFL_STAT_REDIRECT);
	return bpf_redirect(v.oif, 0);
}

/*
 * Step 1 for either hook. TC: the headers may not all be in the skb's linear
 * part. Only a frame that does not parse from it is pulled (at most 128
 * bytes, more than any header stack we take) and parsed again: packets whose
 * headers are linear, which is nearly all, are never copied, whether they
 * are passed or forwarded (the rewrite touches only parsed bytes).
 */
static __always_inline int ofl_parse_ctx(void *ctx, const int hook, const struct ofl_iface *ifc,
					 struct ofl_pkt *p)
{
	if (hook == OFL_HOOK_TC) {
		struct __sk_buff *skb = ctx;
		int hw_vid = skb->vlan_present ? (int)(skb->vlan_tci & 0xfff) : -1;
		__be16 l3_proto = ifc->flags & OFL_IF_L3 ? (__be16)skb->protocol : 0;
		__u32 pull = skb->len < 128 ? skb->len : 128;
		int ret;

		ret = ofl_parse((void *)(long)skb->data, (void *)(long)skb->data_end, skb->len,
				ifc->dsa_proto, hw_vid, l3_proto, p);
		if (ret != OFL_STAT_PASS_L2 || (long)skb->data_end - (long)skb->data >= pull)
			return ret;
		bpf_skb_pull_data(skb, pull);
		return ofl_parse((void *)(long)skb->data, (void *)(long)skb->data_end, skb->len,
				 ifc->dsa_proto, hw_vid, l3_proto, p);
	} else {
		struct xdp_md *xdp = ctx;
		void *data = (void *)(long)xdp->data;
		void *data_end = (void *)(long)xdp->data_end;

		return ofl_parse(data, data_end, data_end - data, ifc->dsa_proto, -1, 0, p);
	}
}

/* The shared worker: steps 1 to 5 for one frame. */
static __always_inline int ofl_forward(void *ctx, const int hook)
{
	const int pass = hook == OFL_HOOK_TC ? TC_ACT_OK : XDP_PASS;
	struct __sk_buff *skb = ctx;
	struct xdp_md *xdp = ctx;
	const struct ofl_config *cfg;
	struct ofl_flow *flow;
	struct ofl_iface ifc;
	struct ofl_pkt p;
	__u32 ifindex, seg_len;
	int ret;

	ofl_count(OFL_STAT_RX);
	cfg = ofl_config_get();
	if (!cfg)
		return pass;
	ifindex = hook == OFL_HOOK_TC ? skb->ifindex : xdp->ingress_ifindex;
	ifc = ofl_iface_of(cfg, ifindex);
	if (hook == OFL_HOOK_XDP && (ifc.flags & OFL_IF_L3))
		return pass; /* generic XDP on an L3 device: not ours */
	ret = ofl_parse_ctx(ctx, hook, &ifc, &p);
	if (ret) {
		ofl_count(ret);
		return pass;
	}
	p.key.ifindex = ifindex;

	seg_len = p.l3_len;
	if (hook == OFL_HOOK_TC && skb->gso_size)
		seg_len = p.l3l4_hlen + skb->gso_size;
	flow = ofl_decide(cfg, &p, seg_len, hook, ifc.flags);
	if (!flow) {
		if (p.drop)
			return hook == OFL_HOOK_TC ? TC_ACT_SHOT : XDP_DROP;
		return pass;
	}
	if (hook == OFL_HOOK_TC)
		return ofl_tc_forward(skb, &p, flow);
	return ofl_xdp_forward(xdp, &p, flow);
}

SEC("xdp")
int ofl_xdp(struct xdp_md *ctx)
{
	return ofl_forward(ctx, OFL_HOOK_XDP);
}

SEC("tc")
int ofl_tc(struct __sk_buff *skb)
{
	return ofl_forward(skb, OFL_HOOK_TC);
}

/*
 * TC egress of the devices the agent attached to: after a ruleset change,
 * a handed-back flow whose packet the kernel sends here (past its forward
 * and postrouting hooks, so judged by the ruleset) is stamped as seen in
 * ofl_probes. Never changes or drops a packet. Switch tags on egress frames
 * are in the transmit format, which the ingress parser does not take: such
 * frames simply find no probe (the flow stays with the kernel).
 */
SEC("tc")
int ofl_tc_egress(struct __sk_buff *skb)
{
	const struct ofl_config *cfg = ofl_config_get();
	struct ofl_probe *probe;
	struct ofl_iface ifc;
	struct ofl_pkt p;
	__u64 now;

	if (!cfg || !(cfg->flags & OFL_CFG_PROBE))
		return TC_ACT_OK;
	ifc = ofl_iface_of(cfg, skb->ifindex);
	ifc.dsa_proto = OFL_DSA_NONE;
	if (ofl_parse_ctx(skb, OFL_HOOK_TC, &ifc, &p))
		return TC_ACT_OK;
	p.key.vlan_outer = 0;
	p.key.vlan_inner = 0;
	p.key.pppoe_sid = 0;
	p.key.dsa_port = OFL_DSA_PORT_NONE;
	probe = bpf_map_lookup_elem(&ofl_probes, &p.key);
	if (!probe)
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	if ((__s64)(now - probe->armed_ns) < 0)
		return TC_ACT_OK;
	probe->seen_ns = now;
	__sync_fetch_and_add(&probe->packets, 1);
	ofl_count(OFL_STAT_PROBE_SEEN);
	return TC_ACT_OK;
}

/* The layout stamp (offload.h): read from the file by the agent before it
 * loads anything; libbpf leaves the section alone. */
#define OFL_LAYOUT_SIZE(s) sizeof(struct s),
#define OFL_LAYOUT_FIELD(s, f)                                                 \
	__builtin_offsetof(struct s, f), sizeof(((struct s *)0)->f),
const __u16 ofl_layout_table[] SEC("ofl_layout") __attribute__((used)) = {
	OFL_LAYOUT_VERSION, OFL_LAYOUT(OFL_LAYOUT_SIZE, OFL_LAYOUT_FIELD)
};

char LICENSE[] SEC("license") = "Dual BSD/GPL";
