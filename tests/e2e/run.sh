#!/usr/bin/env bash
# Run the mediamesh end-to-end tests: setup (idempotent), then pytest with the venv's python.
# Extra arguments go to pytest, e.g.  tests/e2e/run.sh -k selfcheck   or
#   tests/e2e/run.sh tests/e2e/test_churn.py -s
# Exit code = pytest's.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

bash "$HERE/setup.sh" || { echo "[e2e] setup.sh failed" >&2; exit 1; }

cd "$REPO"
# run the whole suite unless a test path was given
targets=(tests/e2e)
for a in "$@"; do
    case "$a" in
        -*) ;;
        *) [ -e "${a%%::*}" ] && targets=() ;;
    esac
done
echo "[e2e] .venv/bin/python -m pytest ${targets[*]} -v $*"
"$REPO/.venv/bin/python" -m pytest "${targets[@]}" -v "$@"
exit $?
