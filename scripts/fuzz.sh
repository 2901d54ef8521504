#!/usr/bin/env bash
# A long fuzzing run: every harness under fuzz/ for the given seconds each
# (default 600), corpora kept in FUZZ_CORPUS (default /var/tmp/qgaproxy-fuzz)
# so that the next run starts where this one stopped. Crash inputs land in
# FUZZ_ARTIFACTS (default: the current directory) as crash-*.
# CI runs a short fixed-size smoke of the same harnesses (tests/test_fuzz.py).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python fuzz/run.py --seconds "$seconds" \
    --corpus-dir "${FUZZ_CORPUS:-/var/tmp/qgaproxy-fuzz}" --artifacts "${FUZZ_ARTIFACTS:-.}" "${@:2}"
