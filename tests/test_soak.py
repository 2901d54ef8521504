"""A short run of scripts/soak.py (the long soak is not for CI): it must
complete with every reply checked and no mismatch, the proxy process
exiting cleanly and its descriptors and tasks back to idle afterwards.
The flatness verdict is printed but not asserted: a short run is mostly
warm-up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_soak_smoke():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "soak.py"), "--seconds", "12", "--clients", "16",
         "--sample", "1", "--warmup", "3", "--fault-gap", "1", "--smoke"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    out = proc.stdout
    print(out[-3000:], proc.stderr[-2000:])
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-3000:])
    assert re.search(r"^mismatches 0$", out, re.M), out
    requests = int(re.search(r"^requests checked (\d+)", out, re.M).group(1))
    faults = int(re.search(r"^faults injected (\d+)", out, re.M).group(1))
    assert requests > 0 and faults > 0, out
    assert re.search(r"exit status 0$", out, re.M), out
    # the table: a row per sample
    assert len(re.findall(r"^\s+\d+\s+\d+\.\d\s+\d+\s+\d+\s+\d+\s+0\s", out, re.M)) >= 5, out
