#!/usr/bin/env bash
# A long run of the property tests (hypothesis "long" profile) for a given
# time: scripts/props-long.sh [seconds] (default 900). Prints the number of
# cases generated per test. CI runs the same tests with the short "ci"
# profile.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-900}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The long profile has no example limit to speak of; the time limit ends it
# (timeout sends SIGINT: hypothesis stops, reports, and pytest prints the
# statistics of what ran).
HYPOTHESIS_PROFILE=long timeout --signal=INT "$seconds" \
    python -m pytest -q -p no:cacheprovider --hypothesis-show-statistics \
    tests/test_router_props.py tests/test_codec_props.py "${@:2}" || rc=$?
# 130: stopped by the time limit, the expected end of a long run.
if [ "${rc:-0}" != 0 ] && [ "${rc:-0}" != 130 ] && [ "${rc:-0}" != 124 ]; then exit "$rc"; fi
