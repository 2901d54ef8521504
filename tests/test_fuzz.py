"""A short run of each fuzz harness (fuzz/, atheris), as CI's smoke test.

Each harness runs in its own process for a fixed number of executions,
seeded from the captured wire corpus; a crash fails the test and prints
the harness's report (the input is left as crash-* in the test's
temporary directory). The long run is scripts/fuzz.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Executions per harness: about ten seconds each on a small, shared machine.
RUNS = {"fuzz_requests": 1200, "fuzz_replies": 3000, "fuzz_qjson": 2500}


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_fuzz_harness_finds_nothing(harness, tmp_path):
    pytest.importorskip("atheris")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "fuzz", "run.py"), "--only", harness, "--runs", str(RUNS[harness]),
         "--corpus-dir", str(tmp_path / "corpus"), "--artifacts", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "%s executions" % RUNS[harness] in proc.stdout, proc.stdout
    assert not list(tmp_path.glob("crash-*"))
