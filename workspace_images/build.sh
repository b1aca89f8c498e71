#!/usr/bin/env bash
# Build Den's workspace images locally; Docker Hub is not assumed reachable.
#
#   den/base:bookworm      debootstrap --variant=minbase from the host's Debian mirror, docker import
#   den/workspace:latest   workspace_images/default/Dockerfile, FROM den/base:bookworm
#
# Idempotent: each image carries the label den.recipe-hash (a hash of its recipe); an image whose
# label matches is not rebuilt. After a (re)build, or with --check, a smoke test runs the
# workspace image under gVisor (runsc) with networking.
#
# Usage: workspace_images/build.sh [--check] [--force]
#   --check  run the smoke test even when nothing was rebuilt
#   --force  rebuild both images
#
# Environment:
#   DEN_DEBIAN_MIRROR           Debian mirror URI (default: read from the host's apt sources)
#   DEN_DEBIAN_SECURITY_MIRROR  security mirror URI; empty for none (default: host's apt sources)
#   DOCKER                      docker CLI to use (default: /usr/bin/docker)
set -euo pipefail

DOCKER=${DOCKER:-/usr/bin/docker}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=bookworm
BASE_IMAGE=den/base:$SUITE
WORKSPACE_IMAGE=den/workspace:latest
WORKSPACE_DIR=$HERE/default

CHECK=0
FORCE=0
for arg in "$@"; do
    case $arg in
        --check) CHECK=1 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "images: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "images: $*"; }
die() { echo "images: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap)"
"$DOCKER" info >/dev/null 2>&1 || die "cannot reach the Docker engine with $DOCKER"

TMP_DIRS=()
cleanup() {
    local d m
    for d in "${TMP_DIRS[@]}"; do
        # debootstrap mounts proc/sys (and may bind /dev) inside the rootfs: unmount before rm.
        awk -v d="$d" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null || true; done
        rm -rf --one-file-system "$d"
    done
}
trap cleanup EXIT

# Mirrors from the host's apt sources (scripts/apt_sources.py reads deb822 "URIs:" stanzas and
# one-line "deb URI suite" lines; DEN_DEBIAN_MIRROR and DEN_DEBIAN_SECURITY_MIRROR override).
# Prints shell assignments: MIRROR, MIRROR_SUITES (the suite and its -updates if the host uses it),
# SECURITY_MIRROR (may be empty).
mirror_vars=$(python3 "$HERE/../scripts/apt_sources.py" image-vars "$SUITE") || exit 1
eval "$mirror_vars"

label_of() {  # image label, empty when the image or the label is missing
    "$DOCKER" image inspect --format "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true
}
image_id() { "$DOCKER" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
drop_old() {  # best effort: remove a replaced image unless something still uses it
    if [ -n "$1" ] && [ "$1" != "$(image_id "$2")" ]; then
        "$DOCKER" image rm "$1" >/dev/null 2>&1 || true
    fi
}
run_logged() {  # run a command with its output in a log file; show the tail on failure
    local logf=$1; shift
    if ! "$@" >"$logf" 2>&1; then
        tail -n 40 "$logf" >&2
        die "failed: $* (full log: $logf)"
    fi
}

# ---------------------------------------------------------------------------------------------
# den/base:bookworm
# ---------------------------------------------------------------------------------------------
base_apt_sources() {
    cat <<EOF
Types: deb
URIs: $MIRROR
Suites: $MIRROR_SUITES
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    if [ -n "$SECURITY_MIRROR" ]; then
        cat <<EOF

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
}

build_base() {
    local rootfs old
    rootfs=$(mktemp -d /var/tmp/den-rootfs.XXXXXX)
    TMP_DIRS+=("$rootfs")
    log "debootstrap --variant=minbase $SUITE from $MIRROR"
    run_logged "$rootfs.log" debootstrap --variant=minbase "$SUITE" "$rootfs/root" "$MIRROR"
    rm -f "$rootfs.log"
    # apt in the image uses the host's mirror(s), in the same deb822 form as the host.
    rm -f "$rootfs/root/etc/apt/sources.list"
    base_apt_sources > "$rootfs/root/etc/apt/sources.list.d/debian.sources"
    # Docker provides these at run time; do not ship the build host's copies.
    rm -f "$rootfs/root/etc/resolv.conf" "$rootfs/root/etc/hostname"
    rm -rf "$rootfs/root/var/cache/apt/archives/"*.deb "$rootfs/root/var/lib/apt/lists/"* \
        "$rootfs/root/var/log/"*.log "$rootfs/root/var/log/apt/"* "$rootfs/root/tmp/"*
    old=$(image_id "$BASE_IMAGE")
    tar --numeric-owner -C "$rootfs/root" -c . | "$DOCKER" import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV LANG=C.UTF-8" \
        --change "LABEL den.image=base den.recipe-hash=$BASE_HASH" \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
    drop_old "$old" "$BASE_IMAGE"
    log "built $BASE_IMAGE"
}

# The base recipe is this script's base steps plus the mirrors they use.
BASE_HASH=$( { declare -f base_apt_sources build_base; echo "$SUITE $MIRROR $MIRROR_SUITES $SECURITY_MIRROR"; } \
    | sha256sum | cut -c1-16)
BUILT=0
if [ "$FORCE" = 0 ] && [ "$(label_of "$BASE_IMAGE" den.recipe-hash)" = "$BASE_HASH" ]; then
    log "$BASE_IMAGE up to date ($BASE_HASH)"
else
    build_base
    BUILT=1
fi

# ---------------------------------------------------------------------------------------------
# den/workspace:latest
# ---------------------------------------------------------------------------------------------
build_workspace() {
    local old logf
    old=$(image_id "$WORKSPACE_IMAGE")
    logf=$(mktemp /var/tmp/den-build.XXXXXX.log)
    log "docker build $WORKSPACE_IMAGE from ${WORKSPACE_DIR#"$HERE/"}/Dockerfile"
    # The classic builder: it uses local images for FROM and needs no buildx plugin.
    run_logged "$logf" env DOCKER_BUILDKIT=0 "$DOCKER" build --network=default \
        --label "den.recipe-hash=$WORKSPACE_HASH" -t "$WORKSPACE_IMAGE" "$WORKSPACE_DIR"
    rm -f "$logf"
    drop_old "$old" "$WORKSPACE_IMAGE"
    log "built $WORKSPACE_IMAGE"
}

# The workspace recipe is every file of its build context, plus the base image it builds on.
WORKSPACE_HASH=$( {
    (cd "$WORKSPACE_DIR" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    image_id "$BASE_IMAGE"
    declare -f build_workspace
} | sha256sum | cut -c1-16)
if [ "$FORCE" = 0 ] && [ "$(label_of "$WORKSPACE_IMAGE" den.recipe-hash)" = "$WORKSPACE_HASH" ]; then
    log "$WORKSPACE_IMAGE up to date ($WORKSPACE_HASH)"
else
    build_workspace
    BUILT=1
fi

# ---------------------------------------------------------------------------------------------
# Smoke test under gVisor
# ---------------------------------------------------------------------------------------------
if [ "$BUILT" = 1 ] || [ "$CHECK" = 1 ]; then
    out=$("$DOCKER" run --rm --runtime=runsc "$WORKSPACE_IMAGE" sh -c 'uname -a; dmesg | head -n1') \
        || die "smoke test: docker run --runtime=runsc failed"
    grep -q 'gVisor' <<<"$out" || die "smoke test: not running under gVisor: $out"
    log "smoke test: runsc sandbox ok ($(tail -n1 <<<"$out"))"
    mirror_host=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).hostname)' "$MIRROR")
    net_cmd="curl -fsS --max-time 30 -o /dev/null '$MIRROR/dists/$SUITE/Release'"
    if ! python3 -c 'import ipaddress, sys; ipaddress.ip_address(sys.argv[1])' "$mirror_host" 2>/dev/null; then
        net_cmd="getent hosts '$mirror_host' >/dev/null && $net_cmd"
    fi
    "$DOCKER" run --rm --runtime=runsc "$WORKSPACE_IMAGE" sh -c "$net_cmd" \
        || die "smoke test: no network inside the runsc sandbox (resolve $mirror_host, fetch $MIRROR)"
    log "smoke test: network ok (resolved $mirror_host, fetched $MIRROR/dists/$SUITE/Release)"
fi

log "$BASE_IMAGE $(image_id "$BASE_IMAGE" | cut -c8-19)"
log "$WORKSPACE_IMAGE $(image_id "$WORKSPACE_IMAGE" | cut -c8-19)"
