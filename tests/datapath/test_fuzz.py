"""A bounded slice of the fuzz campaign (docs/reliability.md): 50,000 mutated
and random frames through both programs, each compared with the model. The
full million runs in ``python -m bench.reliability``; both print their seed,
and ``OFL_FUZZ_SEED`` / ``OFL_FUZZ_FRAMES`` replay or widen a run."""

from __future__ import annotations

import os

from .fuzz import fuzz
from .rig import Rig

SEED = int(os.environ.get("OFL_FUZZ_SEED", "20261201"))
FRAMES = int(os.environ.get("OFL_FUZZ_FRAMES", "50000"))


def test_fuzz_slice_never_differs_from_model(loaded: Rig) -> None:
    report = fuzz(loaded, FRAMES, SEED)
    print(f"fuzz: {report.frames} frames, {report.runs} runs, seed {SEED}, "
          f"{report.rate:.0f} frames/s, {len(report.mismatches)} mismatches")
    assert report.mismatches == [], f"seed {SEED}:\n" + "\n".join(report.mismatches)
    assert report.frames == FRAMES
    # The slice must reach every outcome that matters, not only parse errors.
    for outcome in ("xdp redirect", "tc redirect", "xdp pass_l2", "tc pass_unsupported",
                    "xdp pass_mtu", "xdp pass_ttl", "xdp pass_tcp_flags", "xdp pass_verdict",
                    "xdp new", "xdp pass_l3"):
        assert report.outcomes[outcome] > 0, f"seed {SEED}: no frame reached {outcome}"
    assert report.stats_rounds_checked >= FRAMES // 4096
