/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The one contract between the datapath (offload.bpf.c) and the agent
 * (offloader/, which reads this file through cffi). Types only: the maps
 * are defined in offload.bpf.c.
 *
 * Byte order: fields typed __be16/__be32 are network order; everything else
 * is host order. No bitfields, no bool, padding written out, sizes pinned by
 * _Static_assert so a change here cannot drift silently.
 */
#ifndef OFFLOAD_H
#define OFFLOAD_H

#ifndef OFL_CFFI
#include <linux/types.h>
#endif

/* Families as in the kernel (AF_INET, AF_INET6). */
#define OFL_AF_INET 2
#define OFL_AF_INET6 10

/*
 * Switch (DSA) tag protocols a conduit's frames carry. The name after
 * OFL_DSA_ is the kernel's, lower-cased, as /sys/class/net/<conduit>/dsa/tagging
 * shows it (the agent maps one to the other by that rule). Each tag's bytes
 * follow the kernel's tagger in net/dsa/tag_<name>.c; the lengths are the
 * tag's bytes on the wire (ingress = *_tag_rcv(), egress = *_tag_xmit()).
 */
#define OFL_DSA_NONE 0
#define OFL_DSA_MTK 1 /* after the source MAC */
#define OFL_DSA_QCA 2 /* after the source MAC */
#define OFL_DSA_GSWIP 3 /* before the destination MAC */
#define OFL_DSA_MTK_LEN 4 /* egress: 0 on a frame tagged 802.1Q/802.1ad */
#define OFL_DSA_QCA_LEN 2
#define OFL_DSA_GSWIP_RX_LEN 8
#define OFL_DSA_GSWIP_TX_LEN 4
#define OFL_DSA_PORT_NONE 0xff /* no DSA source port in a key */

/*
 * Flow key: one direction of one connection as the datapath sees it on the
 * lowest device. Addresses of IPv4 flows sit in saddr[0]/daddr[0], the rest
 * is zero. VLAN ids are host order, 0 means no tag (outer first).
 */
struct ofl_key {
	__u32 ifindex; /* ingress device */
	__u16 vlan_outer; /* VID of the outer tag (802.1Q or 802.1ad) */
	__u16 vlan_inner; /* VID of the inner tag of a double-tagged frame */
	__u16 pppoe_sid; /* PPPoE session id, 0 = none */
	__u8 dsa_port; /* source switch port, OFL_DSA_PORT_NONE = none */
	__u8 family; /* OFL_AF_INET or OFL_AF_INET6 */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];
	__be16 sport;
	__be16 dport;
	__be32 saddr[4];
	__be32 daddr[4];
};
_Static_assert(sizeof(struct ofl_key) == 52, "ofl_key layout");

/* Verdict flags. */
#define OFL_V_SNAT (1U << 0) /* rewrite the source address to nat_saddr */
#define OFL_V_DNAT (1U << 1) /* rewrite the destination address to nat_daddr */
#define OFL_V_SPORT (1U << 2) /* rewrite the source port to nat_sport */
#define OFL_V_DPORT (1U << 3) /* rewrite the destination port to nat_dport */
#define OFL_V_REPLY (1U << 4) /* agent only: the key is conntrack's reply direction */
#define OFL_V_ASSURED (1U << 5) /* agent only: conntrack had the entry assured */
#define OFL_V_TC (1U << 6) /* hybrid hook: TC forwards it after GRO, XDP passes it */
/* agent only: offloaded with conntrack's own (short) timeout not yet renewed:
 * the sweep renews it at the first due instant of that timeout's period if
 * the flow carried a packet, else hands it back to the kernel's timeout. */
#define OFL_V_YOUNG (1U << 7)

/*
 * What to do with a flow's packets. The agent computes the checksum deltas
 * (RFC 1624: the 16-bit one's complement sum of ~old + new over the changed
 * words), stored in network byte order so that the datapath can add them to
 * the checksum field as raw memory, the way the kernel's csum helpers do.
 *   csum_l3:   IPv4 header checksum, address changes (the TTL is extra)
 *   csum_l4_addr: TCP/UDP checksum, address changes (the pseudo-header part)
 *   csum_l4_port: TCP/UDP checksum, port changes (payload part)
 * Egress L2 header, written in this order:
 *   dmac smac [dsa tag] [vlan_proto[0] vlan_tci[0]] [vlan_proto[1] vlan_tci[1]]
 *   [PPPoE session header + PPP protocol] L3
 */
struct ofl_verdict {
	__u32 oif; /* output device (the lowest one) */
	__u16 mtu; /* largest L3 packet the path takes (encapsulation excluded) */
	__u8 flags; /* OFL_V_* */
	__u8 dsa_proto; /* OFL_DSA_* of the output device */
	__u8 dmac[6];
	__u8 smac[6];
	__be16 vlan_proto[2]; /* 0 = no tag; outer first */
	__be16 vlan_tci[2];
	__u16 pppoe_sid; /* 0 = no PPPoE */
	__u8 dsa_port; /* output switch port */
	__u8 pad;
	__be16 nat_sport;
	__be16 nat_dport;
	__be32 nat_saddr[4];
	__be32 nat_daddr[4];
	__be16 csum_l3;
	__be16 csum_l4_addr;
	__be16 csum_l4_port;
	__u16 ct_zone; /* agent only: conntrack zone of the connection */
	__u32 ct_mark; /* agent only: the conntrack mark its route was looked up with */
};
_Static_assert(sizeof(struct ofl_verdict) == 80, "ofl_verdict layout");

/* Flow states (ofl_flow.state). */
#define OFL_STATE_OFFLOAD 1 /* rewrite and redirect */
#define OFL_STATE_PASS 2 /* decided: hand every packet to the kernel */

/* What the datapath saw on an offloaded flow (ofl_flow.seen), for the agent. */
#define OFL_SEEN_FIN (1U << 0)
#define OFL_SEEN_RST (1U << 1)
#define OFL_SEEN_SYN (1U << 2)
/* A packet of the offloaded flow went to the kernel (TTL, MTU, what TC cannot
 * rewrite): conntrack put its own, shorter timeout back, so the agent renews
 * the flow on its class's schedule, not the offload timeout's. */
#define OFL_SEEN_KERNEL (1U << 3)

/* Value of the flow map: the agent writes verdict and state, the datapath
 * adds to the counters and stamps last_seen (bpf_ktime_get_ns()). */
struct ofl_flow {
	struct ofl_verdict v;
	__u64 packets;
	__u64 bytes; /* L3 bytes */
	__u64 last_seen_ns;
	__u32 state;
	__u32 seen;
};
_Static_assert(sizeof(struct ofl_flow) == 112, "ofl_flow layout");

/* Value of the pending map: a tuple seen but not decided yet. */
struct ofl_pending {
	__u64 first_seen_ns;
	__u64 last_notify_ns;
	__u64 packets;
	__u64 bytes;
};
_Static_assert(sizeof(struct ofl_pending) == 32, "ofl_pending layout");

/* Ring buffer record: a new tuple for the agent to decide. */
struct ofl_event {
	struct ofl_key key;
	__u32 pad;
	__u64 ts_ns;
};
_Static_assert(sizeof(struct ofl_event) == 64, "ofl_event layout");

/*
 * Early drop (ofl_drops, keyed by ofl_key): tuples the kernel would drop
 * anyway, written by the agent only. Reasons, each counted as
 * OFL_STAT_DROP_ROUTE + reason:
 *   ROUTE        the input route lookup fails silently (blackhole route,
 *                martian source): the kernel answers nothing
 *   UNREACHABLE  unreachable/prohibit/no route, and the tuple kept coming
 *                after the kernel's ICMP answer (learned)
 *   LEARNED      the tuple kept coming and conntrack never confirmed it
 */
#define OFL_DROP_ROUTE 0
#define OFL_DROP_UNREACHABLE 1
#define OFL_DROP_LEARNED 2
#define OFL_DROP_REASONS 3

struct ofl_drop {
	__u64 expires_ns; /* CLOCK_MONOTONIC; the datapath forgets the entry after */
	__u64 packets; /* dropped, counted by the datapath */
	__u64 bytes; /* L3 bytes */
	__u32 reason; /* OFL_DROP_* */
	/* Dropped only when addressed to this MAC, the router's on the ingress
	 * L3 device (all zero: any, for devices without L2 header): frames
	 * bridged between two ports never meet routing, so never drop here. */
	__u8 dmac[6];
	__u8 pad[6];
};
_Static_assert(sizeof(struct ofl_drop) == 40, "ofl_drop layout");

/*
 * Egress probe (ofl_probes): a flow handed back after a ruleset change,
 * keyed by the tuple it leaves with (after NAT; ifindex, VLAN, PPPoE and DSA
 * fields zero). The TC egress program stamps seen_ns when the kernel sends
 * one of its packets at or after armed_ns: proof that the new ruleset still
 * forwards it (docs/design.md, "The ruleset watcher").
 */
struct ofl_probe {
	__u64 armed_ns; /* sightings before this do not count */
	__u64 seen_ns; /* last sighting at or after armed_ns, 0 = none */
	__u64 packets; /* sightings at or after armed_ns */
};
_Static_assert(sizeof(struct ofl_probe) == 24, "ofl_probe layout");

/* Per-device settings, keyed by ifindex (ofl_ifaces). */
#define OFL_IF_L3 (1U << 0) /* no L2 header on this device (ppp): TC only */
#define OFL_IF_HYBRID (1U << 1) /* XDP runs before TC here: TC leaves new tuples to it */
struct ofl_iface {
	__u8 dsa_proto; /* frames on this device carry OFL_DSA_* tags */
	__u8 flags; /* OFL_IF_* */
	__u8 pad[2];
};
_Static_assert(sizeof(struct ofl_iface) == 4, "ofl_iface layout");

/* Global settings, index 0 of ofl_config. */
#define OFL_CFG_ENABLED (1U << 0) /* offload at all; off: pass everything */
#define OFL_CFG_IFACES (1U << 1) /* some device has settings in ofl_ifaces */
#define OFL_CFG_DROP (1U << 2) /* early drop: look tuples up in ofl_drops */
#define OFL_CFG_PROBE (1U << 3) /* ofl_probes has entries: the egress program looks */
struct ofl_config {
	__u64 heartbeat_ns; /* last agent heartbeat, CLOCK_MONOTONIC */
	__u64 heartbeat_timeout_ns; /* stale after this: pass everything */
	__u64 renotify_ns; /* re-announce a pending tuple after this */
	__u32 flags; /* OFL_CFG_* */
	__u32 pad;
};
_Static_assert(sizeof(struct ofl_config) == 32, "ofl_config layout");

/* Per-CPU counters (ofl_stats), one __u64 each. */
enum ofl_stat {
	OFL_STAT_RX = 0, /* every packet the program ran on */
	OFL_STAT_PASS_L2, /* not an L2/L3 we parse */
	OFL_STAT_PASS_L3, /* IPv4 options/fragments, IPv6 ext headers, not TCP/UDP */
	OFL_STAT_PASS_STALE, /* agent heartbeat stale: fail-safe */
	OFL_STAT_NEW, /* new tuple put in the pending map */
	OFL_STAT_PENDING, /* packet of a pending tuple */
	OFL_STAT_EVENT_DROP, /* ring buffer full */
	OFL_STAT_PASS_VERDICT, /* flow decided as pass */
	OFL_STAT_PASS_TTL,
	OFL_STAT_PASS_MTU,
	OFL_STAT_PASS_TCP_FLAGS, /* FIN, RST or SYN */
	OFL_STAT_PASS_UNSUPPORTED, /* encapsulation the hook cannot rewrite */
	OFL_STAT_REDIRECT,
	OFL_STAT_REDIRECT_FAIL,
	OFL_STAT_PASS_HYBRID, /* XDP left an offloaded flow to TC (OFL_V_TC) */
	OFL_STAT_DROP_ROUTE, /* early drop, by OFL_DROP_* reason (same order) */
	OFL_STAT_DROP_UNREACHABLE,
	OFL_STAT_DROP_LEARNED,
	OFL_STAT_PROBE_SEEN, /* egress: a probed flow's packet left after the arm */
	OFL_STAT_MAX,
};

/*
 * Layout stamp: each struct above as its size, then each field as (offset,
 * size), in the order listed here, after OFL_LAYOUT_VERSION. The object
 * carries this table in its "ofl_layout" section (offload.bpf.c; libbpf
 * skips the section, nothing is loaded); offloader/layout.py builds the same
 * table with cffi and refuses an object whose table differs: one built from
 * another version of this header. Python also checks that the list names
 * every field of every struct above, so it cannot fall behind.
 */
#define OFL_LAYOUT_VERSION 1
#define OFL_LAYOUT(S, F)                                                       \
	S(ofl_key) F(ofl_key, ifindex) F(ofl_key, vlan_outer)                  \
	F(ofl_key, vlan_inner) F(ofl_key, pppoe_sid) F(ofl_key, dsa_port)      \
	F(ofl_key, family) F(ofl_key, proto) F(ofl_key, pad)                   \
	F(ofl_key, sport) F(ofl_key, dport) F(ofl_key, saddr)                  \
	F(ofl_key, daddr)                                                      \
	S(ofl_verdict) F(ofl_verdict, oif) F(ofl_verdict, mtu)                 \
	F(ofl_verdict, flags) F(ofl_verdict, dsa_proto) F(ofl_verdict, dmac)   \
	F(ofl_verdict, smac) F(ofl_verdict, vlan_proto)                        \
	F(ofl_verdict, vlan_tci) F(ofl_verdict, pppoe_sid)                     \
	F(ofl_verdict, dsa_port) F(ofl_verdict, pad) F(ofl_verdict, nat_sport) \
	F(ofl_verdict, nat_dport) F(ofl_verdict, nat_saddr)                    \
	F(ofl_verdict, nat_daddr) F(ofl_verdict, csum_l3)                      \
	F(ofl_verdict, csum_l4_addr) F(ofl_verdict, csum_l4_port)              \
	F(ofl_verdict, ct_zone) F(ofl_verdict, ct_mark)                           \
	S(ofl_flow) F(ofl_flow, v) F(ofl_flow, packets) F(ofl_flow, bytes)     \
	F(ofl_flow, last_seen_ns) F(ofl_flow, state) F(ofl_flow, seen)         \
	S(ofl_pending) F(ofl_pending, first_seen_ns)                           \
	F(ofl_pending, last_notify_ns) F(ofl_pending, packets)                 \
	F(ofl_pending, bytes)                                                  \
	S(ofl_event) F(ofl_event, key) F(ofl_event, pad) F(ofl_event, ts_ns)   \
	S(ofl_drop) F(ofl_drop, expires_ns) F(ofl_drop, packets)               \
	F(ofl_drop, bytes) F(ofl_drop, reason) F(ofl_drop, dmac)               \
	F(ofl_drop, pad)                                                       \
	S(ofl_probe) F(ofl_probe, armed_ns) F(ofl_probe, seen_ns)              \
	F(ofl_probe, packets)                                                  \
	S(ofl_iface) F(ofl_iface, dsa_proto) F(ofl_iface, flags)               \
	F(ofl_iface, pad)                                                      \
	S(ofl_config) F(ofl_config, heartbeat_ns)                              \
	F(ofl_config, heartbeat_timeout_ns) F(ofl_config, renotify_ns)         \
	F(ofl_config, flags) F(ofl_config, pad)

#endif /* OFFLOAD_H */
