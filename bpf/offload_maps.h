/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Maps of the datapath, kept apart from the types in offload.h. Every map is
 * pinned by name when the agent asks libbpf to (bpf_map__set_pin_path), so a
 * restarted agent finds the flows its predecessor offloaded. The agent sizes
 * ofl_flows and ofl_pending before load.
 */
#ifndef OFFLOAD_MAPS_H
#define OFFLOAD_MAPS_H

/* Decided flows. Only the agent inserts or deletes here, so a flood of new
 * tuples can never evict an offloaded flow. Preallocated: no allocation on
 * the datapath. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ofl_key);
	__type(value, struct ofl_flow);
} ofl_flows SEC(".maps");

/* Tuples seen but not decided yet; the datapath inserts, LRU evicts. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct ofl_key);
	__type(value, struct ofl_pending);
} ofl_pending SEC(".maps");

/* Early drops, apart from the flow map: LRU and bounded, so learned drops
 * can never evict an offloaded flow nor grow without bound. Only the agent
 * inserts; the datapath counts and forgets expired entries. Sized by the
 * agent (early_drop_entries). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ofl_key);
	__type(value, struct ofl_drop);
} ofl_drops SEC(".maps");

/* Flows handed back after a ruleset change, by the tuple they leave with:
 * the egress program's proof that the kernel still forwards them. Only the
 * agent inserts; allocated on use (empty nearly always). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ofl_key);
	__type(value, struct ofl_probe);
} ofl_probes SEC(".maps");

/* New tuples for the agent: ofl_event records (72 bytes with the ring's
 * header). The agent sizes it before load (event_ring_kib, 512 KiB: about
 * 7,280 records); when full, events are counted as dropped and the
 * agent's sweep of ofl_pending catches those tuples. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} ofl_events SEC(".maps");

/* Output devices for bpf_redirect_map() from XDP, keyed by ifindex. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} ofl_tx_ports SEC(".maps");

/* Per-device settings (DSA tag protocol), keyed by ifindex. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct ofl_iface);
} ofl_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ofl_config);
} ofl_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OFL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ofl_stats SEC(".maps");

#endif /* OFFLOAD_MAPS_H */
