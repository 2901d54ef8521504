#!/usr/bin/env bash
# A long run of the property tests with the hypothesis "long" profile
# (tests/conftest.py): scripts/props-long.sh [examples] (default 5000 for
# the router machine, a quarter of that for each codec property; about
# 10-15 minutes on a small machine). Prints the cases generated per test.
# CI runs the same tests with the short "ci" profile.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_PROFILE=long HYPOTHESIS_MAX_EXAMPLES="${1:-5000}"
exec python -m pytest -q -p no:cacheprovider --hypothesis-show-statistics \
    tests/test_router_props.py tests/test_codec_props.py "${@:2}"
