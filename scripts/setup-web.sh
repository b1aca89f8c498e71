#!/usr/bin/env bash
# The browser side of Den: xterm.js for the web terminal, from npm into web/node_modules
# (Den serves it; nothing is copied into the repository by hand). With --test, also what the
# browser tests need: Chromium from Debian (driven by Playwright, which the virtualenv's test
# extra installs) and the OpenID provider of the login tests (tests/oidc, oidc-provider).
#
# Idempotent: a package whose lock file has not changed since its last install is skipped,
# so a second run takes a second. Installing Debian packages needs root.
#
# Usage: scripts/setup-web.sh [--test]
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WITH_TEST=0
for arg in "$@"; do
    case $arg in
        --test) WITH_TEST=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup-web: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "setup-web: $*"; }
die() { echo "setup-web: ERROR: $*" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

apt_install() {  # install Debian packages, refreshing the package lists once if needed
    [ "$(id -u)" -eq 0 ] || die "installing $* needs root"
    log "installing $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    }
}

# Node and npm: Debian's, unless a node with npm is already there (e.g. from NodeSource).
if command -v npm >/dev/null && command -v node >/dev/null; then
    log "node $(node --version) and npm $(npm --version) present"
else
    apt_install nodejs npm
fi

npm_ci() {  # npm ci in $1 unless node_modules matches package-lock.json already
    local dir=$1 stamp want
    stamp="$dir/node_modules/.den-lock-sha256"
    want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "npm packages of ${dir#"$REPO_ROOT"/} present"
        return
    fi
    log "npm ci in ${dir#"$REPO_ROOT"/}"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$want" > "$stamp"
}

npm_ci "$REPO_ROOT/web"
for f in xterm/lib/xterm.js xterm/css/xterm.css addon-fit/lib/addon-fit.js; do
    [ -f "$REPO_ROOT/web/node_modules/@xterm/$f" ] || die "web/node_modules/@xterm/$f is missing"
done

if [ "$WITH_TEST" = 1 ]; then
    missing=()
    for p in chromium fonts-dejavu-core; do is_installed "$p" || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; else log "chromium present"; fi
    npm_ci "$REPO_ROOT/tests/oidc"
fi
log "done"
