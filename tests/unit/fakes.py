"""Fake netlink and sysfs facts for the resolver's unit tests.

FAKES, not a real kernel: a FakeIPRoute answers link, route, neighbour, FDB,
VLAN, address and rule queries from dictionaries, shaped like pyroute2's
answers; sysfs() writes the DSA files the kernel would have. What runs for
real is the resolver and the device-stack code.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

from offloader.datapath import FlowKey


class Msg(dict[str, Any]):
    """Enough of a pyroute2 message: attributes by name, nested lookups."""

    def get_nested(self, *names: str) -> Any:
        cur: Any = self
        for n in names:
            if cur is None:
                return None
            cur = cur.get(n)
        return cur


def link(index: int, name: str, *, kind: str = "", master: int = 0, mac: str = "",
         mtu: int = 1500, lower: int = 0, ifi_type: int = 1, data: dict[str, Any] | None = None,
         up: bool = True) -> Msg:
    info = Msg(IFLA_INFO_KIND=kind, IFLA_INFO_DATA=Msg(data or {})) if kind else None
    return Msg(index=index, flags=1 if up else 0, ifi_type=ifi_type, IFLA_IFNAME=name,
               IFLA_ADDRESS=mac or f"02:00:00:00:00:{index:02x}", IFLA_MTU=mtu,
               IFLA_MASTER=master or None, IFLA_LINK=lower or None, IFLA_LINKINFO=info)


class FakeIPRoute:
    def __init__(self, links: list[Msg], routes: dict[str, Any],
                 neigh: dict[tuple[int, str], str], fdb: dict[tuple[Any, ...], int], *,
                 addrs: set[int] | dict[int, str] | None = None,
                 vlans: dict[int, dict[int, bool]] | None = None,
                 rules: list[Msg] | None = None) -> None:
        self.links = {m["index"]: m for m in links}
        self.routes = routes
        self.neighs = neigh
        self.fdbs = fdb  # (bridge, MAC) or (bridge, MAC, VLAN) -> port
        # ifindexes with an address (a set: some address of their own)
        self.addrs = addrs or set()
        self.vlans = vlans or {}  # port -> {vid: untagged}
        self.rules = rules if rules is not None else [Msg(FRA_TABLE=254)]
        self.route_queries: list[dict[str, Any]] = []
        self.neigh_queries: list[tuple[int, str]] = []
        self.qdiscs: list[Msg] = []  # RTM_GETQDISC's answer
        self.qdisc_dumps = 0

    def link(self, cmd: str, index: int) -> list[Msg]:
        return [self.links[index]]

    def get_links(self) -> list[Msg]:
        return list(self.links.values())

    def get_qdiscs(self) -> list[Msg]:
        self.qdisc_dumps += 1
        return list(self.qdiscs)

    def route(self, cmd: str, **kw: Any) -> list[Msg]:
        self.route_queries.append(kw)
        # A destination's route, or its routes by (mark, tos) / mark.
        route = self.routes[kw["dst"]]
        if isinstance(route, dict):
            pick = (kw.get("mark", 0), kw.get("tos", 0))
            route = route.get(pick) or route.get(pick[0]) or route[0]
        oif, gw = route
        return [Msg(type=1, RTA_OIF=oif, RTA_GATEWAY=gw)]

    def neigh(self, cmd: str, dst: str, ifindex: int, family: int) -> list[Msg]:
        self.neigh_queries.append((ifindex, dst))
        return [Msg(NDA_LLADDR=self.neighs[(ifindex, dst)], state=0x02)]

    def fdb(self, cmd: str, lladdr: str, master: int, vlan: int = 0) -> list[Msg]:
        port = self.fdbs.get((master, lladdr, vlan)) or self.fdbs[(master, lladdr)]
        return [Msg(ifindex=port)]

    def get_vlans(self, index: int) -> list[Msg]:
        infos = [("IFLA_BRIDGE_VLAN_INFO", {"vid": vid, "flags": 0x4 if untagged else 0})
                 for vid, untagged in self.vlans.get(index, {}).items()]
        return [Msg(index=index, IFLA_AF_SPEC={"attrs": infos})]

    def get_addr(self) -> list[Msg]:
        addrs = self.addrs if isinstance(self.addrs, dict) else {
            i: f"198.51.100.{i}" for i in self.addrs}
        return [Msg(index=i, IFA_ADDRESS=a) for i, a in addrs.items()]

    def get_rules(self, family: int) -> list[Msg]:
        return self.rules if family == socket.AF_INET else []

    def close(self) -> None:
        pass


def sysfs(tmp: Path, tagging: dict[str, str], ports: dict[str, int]) -> Path:
    for dev, proto in tagging.items():
        (tmp / dev / "dsa").mkdir(parents=True)
        (tmp / dev / "dsa" / "tagging").write_text(proto + "\n")
    for dev, port in ports.items():
        (tmp / dev).mkdir(parents=True, exist_ok=True)
        (tmp / dev / "phys_port_name").write_text(f"p{port}\n")
    return tmp


def key(ifindex: int, src: str, dst: str, **kw: Any) -> FlowKey:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = socket.AF_INET if s.version == 4 else socket.AF_INET6
    return FlowKey(ifindex=ifindex, family=fam, proto=6, src=s, dst=d, sport=40000, dport=443,
                   **kw)


