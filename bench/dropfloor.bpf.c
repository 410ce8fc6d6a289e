// SPDX-License-Identifier: GPL-2.0
// The floor of early drop on this machine: a program that drops every frame
// and does nothing else (XDP_DROP / TC_ACT_SHOT). What the device's hook
// itself costs per packet; bench/drop.py compares early drop with it.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int floor_xdp(struct xdp_md *ctx)
{
	return XDP_DROP;
}

SEC("tc")
int floor_tc(struct __sk_buff *skb)
{
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
