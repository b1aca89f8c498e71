#!/usr/bin/env bash
# The whole test suite. `make test` and .ci/run call this (after `make setup`).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

echo "== ruff"
"$VENV/bin/ruff" check server tests migrations || exit 1
echo "== mypy"
"$VENV/bin/mypy" || exit 1
echo "== go vet and go test (the workspace agent)"
(cd agent && GOPROXY=off GOFLAGS= CGO_ENABLED=0 go vet ./... && GOPROXY=off GOFLAGS= \
    CGO_ENABLED=0 go test -count=1 ./...) || exit 1
echo "== pytest"
"$VENV/bin/python" -m pytest --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
