#!/usr/bin/env bash
# Build den-agent (agent/, Go standard library only) into build/agent/den-agent: a static
# binary whose version is the first 12 hex digits of the sha256 of the agent's sources.
# Idempotent: nothing is rebuilt while the sources match the stamp. Installs Debian's
# golang-go when `go` is missing (needs root then).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$repo/agent"
out_dir="$repo/build/agent"
bin="$out_dir/den-agent"
stamp="$out_dir/.stamp"

if ! command -v go >/dev/null 2>&1; then
    echo "build-agent: installing golang-go" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq golang-go >/dev/null
fi

# The sources: every tracked or new file under agent/ except tests, in a stable order.
version="$(cd "$src" && find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) \
    ! -name '*_test.go' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)"

if [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$version" ]]; then
    echo "build-agent: $bin is up to date (version $version)"
    echo "$bin $version"
    exit 0
fi

mkdir -p "$out_dir" "$repo/build/go-cache" "$repo/build/go-path"
export GOCACHE="$repo/build/go-cache" GOPATH="$repo/build/go-path" GOPROXY=off GOFLAGS= \
    CGO_ENABLED=0 GO111MODULE=on
unset GOTOOLCHAIN
tmp="$bin.tmp.$$"
(cd "$src" && go build -trimpath -buildvcs=false -ldflags="-s -w -X main.version=$version" -o "$tmp" .)
mv -f "$tmp" "$bin"
echo "$version" >"$stamp"
echo "build-agent: built $bin (version $version)"
echo "$bin $version"
