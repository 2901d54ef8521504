"""Run the fuzz harnesses (atheris/libFuzzer), each in its own process.

    python fuzz/run.py --runs 20000           # a fixed number of executions each
    python fuzz/run.py --seconds 600          # a time budget each
    python fuzz/run.py --only fuzz_qjson --seconds 60 --corpus-dir /var/tmp/qga-fuzz

Each harness starts from the captured wire corpus (tests/wire/qga-7.2.json)
plus whatever an earlier run with the same --corpus-dir found. A crash
leaves its input as crash-* in the artifacts directory; turn it into a
regression test under tests/. Prints one line per harness: executions,
seconds, and the outcome; exits non-zero if any harness failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

HARNESSES = {
    "fuzz_requests": _common.client_seeds,
    "fuzz_replies": _common.agent_seeds,
    "fuzz_qjson": _common.client_seeds,
}

_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")


def run_one(name: str, corpus_root: str, artifacts: str, runs: int | None, seconds: int | None) -> dict:
    corpus = os.path.join(corpus_root, name)
    _common.write_seed_corpus(corpus, HARNESSES[name]())
    # -reload=0: no rereading of the corpus folder once a second, which adds
    # runs past -runs on a slow machine.
    args = [sys.executable, os.path.join(HERE, name + ".py"), "-max_len=4096", "-reload=0",
            "-artifact_prefix=%s/" % artifacts.rstrip("/")]
    args.append("-runs=%d" % runs if runs is not None else "-max_total_time=%d" % seconds)
    args.append(corpus)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_common.ROOT, env.get("PYTHONPATH")]))
    began = time.monotonic()
    proc = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - began
    found = _DONE.search(proc.stdout)
    return {
        "name": name,
        "rc": proc.returncode,
        "runs": int(found.group(1)) if found else None,
        "seconds": elapsed,
        "output": proc.stdout.decode("utf-8", "replace"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, help="executions per harness")
    budget.add_argument("--seconds", type=int, help="time per harness")
    parser.add_argument("--only", action="append", choices=sorted(HARNESSES))
    parser.add_argument("--corpus-dir", help="keep the corpora here (default: a temporary directory)")
    parser.add_argument("--artifacts", default=".", help="where crash inputs go (default: here)")
    args = parser.parse_args(argv)
    if args.runs is None and args.seconds is None:
        args.seconds = 60
    failed = False
    with tempfile.TemporaryDirectory(prefix="qgaproxy-fuzz-") as tmp:
        root = args.corpus_dir or tmp
        for name in args.only or sorted(HARNESSES):
            result = run_one(name, root, args.artifacts, args.runs, args.seconds)
            ok = result["rc"] == 0
            failed |= not ok
            print(
                "%-14s %s executions in %.1f s: %s"
                % (name, result["runs"] if result["runs"] is not None else "?", result["seconds"],
                   "ok" if ok else "FAILED (rc %d)" % result["rc"]),
                flush=True,
            )
            if not ok:
                print(result["output"][-4000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
