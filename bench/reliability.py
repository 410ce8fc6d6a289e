"""`python -m bench.reliability [--part fuzz,flood,faults,churn,badinput] [--json FILE]`:
the reliability campaign at full length (docs/reliability.md quotes it).

fuzz      1,000,000 frames (``--frames``, ``--seed``) through both programs,
          each compared with the model: count, seed, rate, mismatches.
flood     new 5-tuples from the WAN side as live frames for 60 s
          (``--flood-seconds``) against two offloaded TCP transfers.
faults    SIGKILL, SIGSTOP/SIGCONT, clean restart during one transfer.
churn     route, neighbour, link, conntrack flush, address, zone, helper.
badinput  the refused starts of tests/integration/test_campaign_badinput.py.

The scenarios are the tests' own (tests/integration/campaign.py); here they
run longer and their figures are printed as one JSON object. Needs root, the
built object (cmake) and this machine to itself (no other bench running).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

from offloader.datapath import Datapath, find_object
from offloader.lab import lab_network
from tests.datapath.fuzz import fuzz
from tests.datapath.rig import Rig
from tests.integration import campaign

PARTS = ("fuzz", "flood", "faults", "churn", "badinput")


def run_fuzz(frames: int, seed: int) -> dict[str, Any]:
    dp = Datapath(find_object(), max_flows=1024)
    rig = Rig(dp)
    try:
        r = fuzz(rig, frames, seed)
    finally:
        rig.close()
        dp.close()
    return {"frames": r.frames, "program_runs": r.runs, "refused_by_test_run": r.refused,
            "seed": seed, "frames_per_s": round(r.rate), "seconds": round(r.seconds, 1),
            "mismatches": len(r.mismatches), "first_mismatches": r.mismatches[:3],
            "redirected": r.redirected, "passed": r.passed, "unmodelled": r.unmodelled,
            "counter_rounds_checked": r.stats_rounds_checked,
            "outcomes": dict(r.outcomes.most_common())}


def run_flood(seconds: float) -> dict[str, Any]:
    with lab_network() as topo:
        out = campaign.flood(topo, seconds=seconds)
    out["transfer_up"] = {k: out["transfer_up"].get(k) for k in ("intact", "received", "seconds")}
    out["transfer_down"] = {k: out["transfer_down"].get(k)
                            for k in ("intact", "received", "seconds")}
    return out


def run_faults() -> dict[str, Any]:
    with lab_network() as topo:
        out = campaign.faults(topo)
    out["transfer"] = {k: out["transfer"].get(k) for k in ("intact", "received", "seconds")}
    return out


def run_churn() -> list[dict[str, Any]]:
    with lab_network() as topo:
        cases = campaign.churn(topo)
    with lab_network() as topo:
        cases += campaign.zones_and_helpers(topo)
    return cases


def run_badinput() -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/integration/test_campaign_badinput.py"],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = proc.stdout.strip().splitlines() or ["?"]
    failures = [ln for ln in lines if ln.startswith(("FAILED", "E "))][:20]
    return {"summary": lines[-1], "failures": failures, "returncode": proc.returncode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 1_000_000)
    ap.add_argument("--flood-seconds", type=float, default=60.0)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.reliability needs root (BPF, network namespaces)", file=sys.stderr)
        return 1
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    runners = {"fuzz": lambda: run_fuzz(args.frames, args.seed),
               "flood": lambda: run_flood(args.flood_seconds), "faults": run_faults,
               "churn": run_churn, "badinput": run_badinput}
    for part in parts:
        start = time.monotonic()
        print(f"== {part}", file=sys.stderr, flush=True)
        out[part] = runners[part]()
        out[f"{part}_wall_s"] = round(time.monotonic() - start, 1)
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
