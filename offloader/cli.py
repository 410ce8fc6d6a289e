"""The `ebpf-offloader` command.

    ebpf-offloader run     [-c FILE] [-i IFACE ...] [--hook H] [--object PATH] [-v]
    ebpf-offloader status  [--json [--limit N]] [--watch [SECONDS]] [--top N]
    ebpf-offloader flush
    ebpf-offloader config  [-c FILE] [--json]
    ebpf-offloader lab     [--seconds N] [--hook H] [--keep-going]

Exit codes: 0 success; 1 an error (no agent running for status/flush, the
agent refused this user, the control address held by someone else, a failed
attach or load); 2 a configuration or usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from .config import (
    DEFAULT_CONFIG_PATH,
    HOOKS,
    Settings,
    apply_overrides,
    describe_options,
    format_settings,
    load_settings,
)
from .drops import drop_lines
from .errors import AgentNotRunning, ConfigError, ObjectLoadError, OffloadError

log = logging.getLogger("offloader")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ebpf-offloader",
                                description="Forward established connections with eBPF instead "
                                            "of netfilter.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground until SIGTERM/SIGINT",
                         epilog="options for -o, with their defaults:\n" + describe_options(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("-c", "--config", metavar="FILE",
                     help=f"uci configuration file (default {DEFAULT_CONFIG_PATH} if present)")
    run.add_argument("-i", "--interface", action="append", default=[], metavar="IFACE",
                     help="offload on this interface (repeatable; overrides the configuration)")
    run.add_argument("--hook", choices=HOOKS, help="where the datapath attaches (default: auto)")
    run.add_argument("--object", metavar="PATH", help="BPF object to load")
    run.add_argument("-o", "--option", action="append", default=[], metavar="OPTION=VALUE",
                     help="set any configuration option (repeatable), e.g. -o max_flows=131072 "
                          "-o exclude_src=198.18.5.0/24")
    run.add_argument("-v", "--verbose", action="store_true", help="log every offload and teardown")
    run.add_argument("--syslog", action="store_true", help="log to syslog instead of stderr")

    st = sub.add_parser("status", help="what the running agent offloads")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                    help="refresh in place every SECONDS (default 2)")
    st.add_argument("--top", type=int, default=10, metavar="N", help="busiest flows shown (human)")
    st.add_argument("--limit", type=_positive, metavar="N",
                    help="with --json: only the N busiest flows (counts cover all)")

    sub.add_parser("flush", help="hand every offloaded flow back to the kernel")

    cf = sub.add_parser("config", help="check a configuration and print the effective settings")
    cf.add_argument("-c", "--config", metavar="FILE")
    cf.add_argument("--json", action="store_true")
    cf.add_argument("-o", "--option", action="append", default=[], metavar="OPTION=VALUE",
                    help="as for run: check the settings with these applied")

    lab = sub.add_parser("lab", help="run the built-in lab (namespaces, traffic, status, speed-up)")
    lab.add_argument("--seconds", type=float, default=3.0, help="length of each throughput run")
    lab.add_argument("--hook", choices=("both", "xdp", "tc", "hybrid"), default="both",
                     help="the hooks to measure against the slow path (default: xdp and tc)")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            return _status(args)
        if args.command == "flush":
            from .control import request

            answer = request("flush")
            print(f"flushed {answer['flushed']} flows")
            return 0
        if args.command == "config":
            return _config(args)
        if args.command == "lab":
            from .lab import run_lab

            return run_lab(seconds=args.seconds, hook=args.hook)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except AgentNotRunning as exc:
        print(f"{exc}.", file=sys.stderr)
        return 1
    except ObjectLoadError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        if exc.log:
            print(exc.log[-4000:], file=sys.stderr)
        return 1
    except OffloadError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def _config(args: argparse.Namespace) -> int:
    settings = apply_overrides(load_settings(args.config), args.option)
    if args.json:
        print(json.dumps(settings.to_dict(), indent=2))
    else:
        print(format_settings(settings), end="")
    return 0


def _setup_logging(level: str, verbose: bool, syslog: bool) -> None:
    handler: logging.Handler
    if syslog:
        from logging.handlers import SysLogHandler  # 0.3 MB of modules: only here

        handler = SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("ebpf-offloader: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug output is per message


def _run(args: argparse.Namespace) -> int:
    from .lean import Heap, pyroute2_on_demand

    Heap().fix_thresholds()  # before start-up's allocations (glibc only)
    pyroute2_on_demand()  # before the agent's modules import any of it
    from .agent import run_agent

    def effective() -> Settings:
        settings: Settings = load_settings(args.config)
        overrides: dict[str, Any] = {}
        if args.hook:
            overrides["hook"] = args.hook
        if args.object:
            overrides["object"] = args.object
        if args.interface:
            overrides["interfaces"] = tuple(args.interface)
        if overrides:
            settings = dataclasses.replace(settings, **overrides)
        return apply_overrides(settings, args.option)

    settings = effective()
    _setup_logging(settings.log_level, args.verbose, args.syslog)
    run_agent(settings, load_settings=effective)
    return 0


def _status(args: argparse.Namespace) -> int:
    from .control import request

    if args.json:
        answer = request("status", limit=args.limit) if args.limit else request("status")
        print(json.dumps(answer, indent=2))
        return 0
    if args.watch:
        prev = request("status")
        try:
            while True:
                time.sleep(args.watch)
                cur = request("status")
                sys.stdout.write("\x1b[H\x1b[2J" + render_status(cur, prev, args.watch, args.top))
                sys.stdout.flush()
                prev = cur
        except KeyboardInterrupt:
            return 0
    first = request("status")
    time.sleep(0.5)
    second = request("status")
    sys.stdout.write(render_status(second, first, 0.5, args.top))
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def render_status(cur: dict[str, Any], prev: dict[str, Any] | None, interval: float,
                  top: int = 10) -> str:
    """The human status report (rates from two samples ``interval`` apart)."""
    lines = []
    c = cur["counts"]
    lines.append(f"ebpf-offloader running, pid {cur['pid']}, up {_duration(cur['uptime_s'])}")
    ifaces = ", ".join(f"{i['name']} ({i['hook']})" for i in cur["interfaces"]) or "none"
    lines.append(f"interfaces: {ifaces}")
    if cur.get("shapers"):
        seen = ", ".join(f"{q['qdisc']} on {q['device']}" for q in cur["shapers"])
        lines.append(f"shapers: {seen} (flows through them go by tc or the kernel, "
                     "except with hook xdp)")
    lines.append(f"flows: {c['offloaded']} offloaded, {c['passed']} passed to the kernel, "
                 f"{c['pending']} pending")
    offloaded = [f for f in cur["flows"] if f["state"] == "offloaded"]
    total_bytes = sum(f["bytes"] for f in offloaded)
    total_pkts = sum(f["packets"] for f in offloaded)
    lines.append(f"offloaded traffic: {total_pkts} packets, {_human_bytes(total_bytes)}")
    dp = cur.get("datapath", {})
    if dp.get("pass_stale"):
        lines.append(f"fail-safe engaged {dp['pass_stale']} times (agent heartbeat stale)")
    lines.extend(drop_lines(cur))
    if cur.get("ring_buffer_drops"):
        lines.append(f"new-flow events dropped, ring buffer full: {cur['ring_buffer_drops']} "
                     "(the sweep finds those flows)")
    before: dict[tuple[Any, ...], int] = {}
    if prev:
        for f in prev["flows"]:
            before[_flow_id(f)] = f["bytes"]
    rows = []
    for f in offloaded[:top]:
        rate = (f["bytes"] - before.get(_flow_id(f), f["bytes"])) / interval if interval else 0
        nat = f.get("nat") or {}
        nat_text = " ".join(f"{k}={v}" for k, v in nat.items()) or "-"
        rows.append((f"{f['proto']}", _endpoint(f["src"], f["sport"]),
                     _endpoint(f["dst"], f["dport"]), f"{f['in_dev']}>{f.get('out_dev', '?')}",
                     str(f["packets"]), _human_bytes(f["bytes"]), _human_bytes(rate) + "/s",
                     nat_text))
    head = ("proto", "source", "destination", "devices", "packets", "bytes", "rate", "nat")
    lines.extend(_table("busiest offloaded flows:", head, rows))
    passed = [(f["proto"], _endpoint(f["src"], f["sport"]), _endpoint(f["dst"], f["dport"]),
               f["in_dev"], f.get("why") or "-")
              for f in cur["flows"] if f["state"] == "passed"][:top]
    lines.extend(_table("flows passed to the kernel, and why:",
                        ("proto", "source", "destination", "device", "why"), passed))
    return "\n".join(lines) + "\n"


def _table(title: str, head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    """A titled table with aligned columns; nothing without rows."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["", title, *("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
                         for r in [head, *rows])]


def _flow_id(f: dict[str, Any]) -> tuple[Any, ...]:
    return (f["proto"], f["src"], f["sport"], f["dst"], f["dport"], f["in_dev"])


if __name__ == "__main__":
    sys.exit(main())
