#!/usr/bin/env bash
# Prepare a Debian 12 host to run Den: Docker engine, gVisor (runsc), workspace images.
#
# Run as root. Idempotent: every step checks first and does nothing when already satisfied,
# so a second run changes nothing and takes a few seconds.
#
# Usage: scripts/setup-host.sh [--no-postgres] [--no-images] [--check]
#   --no-postgres  do not install the PostgreSQL server (only needed by the test suite)
#   --no-images    do not build the workspace images (workspace_images/build.sh)
#   --check        pass --check to workspace_images/build.sh (always run the gVisor smoke test)
#
# Environment:
#   DEN_DEBIAN_MIRROR  Debian mirror URI (default: read from the host's apt sources)
#   DOCKER             docker CLI to use (default: /usr/bin/docker, Debian's CLI; see docs)
#
# Facts this relies on are in RUNTIME.md: Debian bookworm's runsc is too old, so runsc
# 0.0~20240729 is taken from Debian trixie (binary only, trixie never becomes a permanent apt
# source), and runsc releases before 20240801 need a wrapper on kernels that show
# /proc/sys/net/core/rmem_default in every network namespace.
set -euo pipefail

RUNSC_WANT=20240729                    # upstream release date of the runsc we install
RUNSC_BIN=/usr/local/bin/runsc
RUNSC_WRAPPER=/usr/local/lib/den/runsc-wrapper
DAEMON_JSON=/etc/docker/daemon.json
DOCKERD_LOG=/var/log/den-dockerd.log
DOCKER=${DOCKER:-/usr/bin/docker}
export DOCKER

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WITH_POSTGRES=1
WITH_IMAGES=1
BUILD_ARGS=()
for arg in "$@"; do
    case $arg in
        --no-postgres) WITH_POSTGRES=0 ;;
        --no-images) WITH_IMAGES=0 ;;
        --check) BUILD_ARGS+=(--check) ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -r /etc/debian_version ] || die "this script supports Debian 12 (bookworm) only"

export DEBIAN_FRONTEND=noninteractive
TMP_DIRS=()
POLICY_RC_CREATED=0
cleanup() {
    local d
    for d in "${TMP_DIRS[@]}"; do rm -rf --one-file-system "$d"; done
    if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

# The Debian mirror the host's apt already uses (scripts/apt_sources.py reads the deb822 .sources
# stanzas and one-line .list entries), preferring an entry for the host's own suite.
debian_mirror() {
    if [ -n "${DEN_DEBIAN_MIRROR:-}" ]; then echo "${DEN_DEBIAN_MIRROR%/}"; return; fi
    python3 "$REPO_ROOT/scripts/apt_sources.py" mirror
}

# ---------------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------------
is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

want_pkgs=(docker.io debootstrap git iproute2 util-linux ca-certificates openssh-client python3)
[ "$WITH_POSTGRES" = 1 ] && want_pkgs+=(postgresql)
missing=()
for p in "${want_pkgs[@]}"; do is_installed "$p" || missing+=("$p"); done
venv_works() {
    command -v python3 >/dev/null || return 1
    local d rc=0
    d=$(mktemp -d)
    python3 -m venv "$d/v" >/dev/null 2>&1 || rc=1
    rm -rf "$d"
    return $rc
}
is_installed python3-venv || venv_works || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    # No init system here may start services from maintainer scripts (there may be no systemd);
    # dockerd is started below, the way this host supports.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
else
    log "packages present (${want_pkgs[*]})"
fi

MIRROR=$(debian_mirror)

# ---------------------------------------------------------------------------------------------
# 2. runsc from Debian trixie (binary only)
# ---------------------------------------------------------------------------------------------
runsc_version() {  # prints the release date (YYYYMMDD) of a runsc binary, or nothing
    "$1" --version 2>/dev/null | head -n1 | grep -o '20[0-9]\{6\}' | head -n1 || true
}

have=$( [ -x "$RUNSC_BIN" ] && runsc_version "$RUNSC_BIN" || true )
if [ "$have" = "$RUNSC_WANT" ]; then
    log "runsc $have present at $RUNSC_BIN"
else
    log "installing runsc $RUNSC_WANT from Debian trixie (${MIRROR}; found: ${have:-none})"
    t=$(mktemp -d); TMP_DIRS+=("$t")
    mkdir -p "$t/lists/partial"
    # Signed-By the archive keyring: bookworm's debian-archive-keyring carries the trixie keys,
    # so the trixie InRelease is verified, and apt checks the .deb against its Packages hash.
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" \
        > "$t/sources.list"
    aptopts=(-o "Dir::Etc::SourceList=$t/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$t/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
             -o APT::Sandbox::User=root)
    apt-get "${aptopts[@]}" -qq update
    ver=$(apt-cache "${aptopts[@]}" madison runsc | awk -v w="0.0~$RUNSC_WANT" \
            '{ v = $3 } index(v, w) == 1 { print v; exit }')
    [ -n "$ver" ] || die "runsc 0.0~$RUNSC_WANT not found in trixie on $MIRROR"
    (cd "$t" && apt-get "${aptopts[@]}" -qq download "runsc=$ver" >/dev/null)
    dpkg-deb -x "$t"/runsc_*.deb "$t/root"
    got=$(runsc_version "$t/root/usr/bin/runsc")
    [ "$got" = "$RUNSC_WANT" ] || die "downloaded runsc reports version '${got}', wanted $RUNSC_WANT"
    install -m 0755 "$t/root/usr/bin/runsc" "$RUNSC_BIN.new"
    mv -f "$RUNSC_BIN.new" "$RUNSC_BIN"
    log "installed runsc $ver to $RUNSC_BIN"
fi

# ---------------------------------------------------------------------------------------------
# 3. Kernel quirk: runsc < 20240801 + /proc/sys/net/core/rmem_default in every netns
# ---------------------------------------------------------------------------------------------
runsc_ver=$(runsc_version "$RUNSC_BIN")
if [ "${runsc_ver:-0}" -lt 20240801 ] && unshare -n test -e /proc/sys/net/core/rmem_default; then
    wrapper_text=$(cat <<EOF
#!/bin/sh
# Installed by Den's scripts/setup-host.sh. runsc before release-20240801 decides it runs in the
# host network namespace when /proc/sys/net/core/rmem_default exists; on this kernel it exists in
# every namespace. Run runsc in a private mount namespace with /proc/sys/net hidden.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec unshare -m --propagation private sh -c 'mount -t tmpfs -o size=4k none /proc/sys/net && exec "\$0" "\$@"' $RUNSC_BIN "\$@"
EOF
)
    if [ -x "$RUNSC_WRAPPER" ] && [ "$(cat "$RUNSC_WRAPPER")" = "$wrapper_text" ]; then
        log "kernel quirk detected (runsc $runsc_ver); wrapper present at $RUNSC_WRAPPER"
    else
        mkdir -p "$(dirname "$RUNSC_WRAPPER")"
        printf '%s\n' "$wrapper_text" > "$RUNSC_WRAPPER.new"
        chmod 755 "$RUNSC_WRAPPER.new"
        mv -f "$RUNSC_WRAPPER.new" "$RUNSC_WRAPPER"
        log "kernel quirk detected (runsc $runsc_ver); installed wrapper $RUNSC_WRAPPER"
    fi
    RUNTIME_PATH=$RUNSC_WRAPPER
else
    log "no kernel quirk for runsc ${runsc_ver}; registering $RUNSC_BIN directly"
    RUNTIME_PATH=$RUNSC_BIN
fi

# ---------------------------------------------------------------------------------------------
# 4. /etc/docker/daemon.json: merge, never drop other keys
# ---------------------------------------------------------------------------------------------
mkdir -p "$(dirname "$DAEMON_JSON")"
# A second runtime, runsc-gpu (runsc --nvproxy: GPUs for gVisor workspaces, docs/gpus.md), only
# on a host whose NVIDIA driver is loaded and lists a GPU; never elsewhere.
HAVE_GPUS=0
if [ -e /dev/nvidiactl ] && command -v nvidia-smi >/dev/null 2>&1 \
        && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    HAVE_GPUS=1
    log "NVIDIA GPUs found: registering runtime runsc-gpu (runsc --nvproxy)"
fi
json_status=$(python3 - "$DAEMON_JSON" "$RUNTIME_PATH" "$HAVE_GPUS" <<'PY'
import json, os, sys
path, runtime, have_gpus = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
try:
    with open(path) as f:
        text = f.read()
    old = json.loads(text) if text.strip() else {}
except FileNotFoundError:
    old = {}
new = json.loads(json.dumps(old))
new["experimental"] = True
runtimes = new.setdefault("runtimes", {})
entry = dict(runtimes.get("runsc") or {})
entry["path"] = runtime
# The container's own filesystem must outlive a stop (packages installed with apt stay);
# gVisor's default rootfs overlay (root:self) keeps it in sandbox memory only.
# A TCP connection open at checkpoint time (or one the workspace closed in the last minute:
# TIME_WAIT) makes runsc refuse to save ("endpoint cannot be saved in connected state"), and
# a failed checkpoint leaves the container exited: every process lost. --net-disconnect-ok
# resets such connections at the save instead (the peer gets a reset, as after a restore).
ours = ("--overlay2", "--net-disconnect-ok")
args = [a for a in entry.get("runtimeArgs") or [] if not a.startswith(ours)]
entry["runtimeArgs"] = ["--overlay2=none", "--net-disconnect-ok", *args]
runtimes["runsc"] = entry
if have_gpus:
    # nvproxy passes the device nodes listed in the container's spec (Den lists exactly the
    # allocated GPUs') through to the host driver; the driver version must be one this runsc
    # supports (runsc nvproxy list-supported-drivers, newer releases).
    gpu = dict(runtimes.get("runsc-gpu") or {})
    gpu["path"] = runtime
    gpu["runtimeArgs"] = [*entry["runtimeArgs"], "--nvproxy"]
    runtimes["runsc-gpu"] = gpu
# The same runsc on the ptrace platform, for operators who choose it (DEN_GVISOR_RUNTIME=
# runsc-ptrace): an idle sandbox costs almost no host CPU on it (docs/benchmarks.md, "Sleep
# tiers and idle cost"). Its other flags follow runsc's.
ptrace = [a for a in entry["runtimeArgs"] if not a.startswith("--platform")]
runtimes["runsc-ptrace"] = {"path": runtime, "runtimeArgs": [*ptrace, "--platform=ptrace"]}
if new == old:
    print("unchanged")
else:
    tmp = path + ".den-new"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    print("changed")
PY
)
if [ "$json_status" = changed ]; then
    log "updated $DAEMON_JSON (experimental, runtimes.runsc and runsc-ptrace -> $RUNTIME_PATH)"
else
    log "$DAEMON_JSON already has experimental and runtimes.runsc.path=$RUNTIME_PATH"
fi

# ---------------------------------------------------------------------------------------------
# 5. dockerd running with that configuration
# ---------------------------------------------------------------------------------------------
have_systemd() { [ -d /run/systemd/system ]; }
docker_up() { "$DOCKER" info >/dev/null 2>&1; }
wait_docker() {
    for _ in $(seq 1 120); do docker_up && return 0; sleep 0.5; done
    die "dockerd did not answer within 60 s (see $DOCKERD_LOG or journalctl -u docker)"
}
start_docker() {
    if have_systemd; then
        systemctl start docker
    else
        # dockerd starts its own containerd when none is running.
        setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    wait_docker
}
stop_docker() {
    if have_systemd; then systemctl stop docker; return; fi
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    [ -n "$pid" ] || die "dockerd runs but /var/run/docker.pid is missing; restart it by hand"
    kill -TERM "$pid"
    for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    die "dockerd (pid $pid) did not stop within 60 s"
}
config_live() {  # the daemon runs with experimental on, runsc at RUNTIME_PATH, no rootfs overlay,
                # connections reset at a checkpoint, and the ptrace variant registered
    local live ptrace
    live=$("$DOCKER" info --format '{{json (index .Runtimes "runsc")}}' 2>/dev/null || true)
    ptrace=$("$DOCKER" info --format '{{json (index .Runtimes "runsc-ptrace")}}' 2>/dev/null ||
             true)
    [ "$("$DOCKER" version --format '{{.Server.Experimental}}' 2>/dev/null)" = true ] &&
    [[ "$live" == *"\"$RUNTIME_PATH\""* && "$live" == *'"--overlay2=none"'* &&
       "$live" == *'"--net-disconnect-ok"'* ]] &&
    [[ "$ptrace" == *'"--platform=ptrace"'* ]]
}

if ! docker_up; then
    log "starting dockerd ($(have_systemd && echo systemd || echo "background, log $DOCKERD_LOG"))"
    start_docker
elif ! config_live; then
    log "reloading dockerd configuration (SIGHUP)"
    if have_systemd; then systemctl reload docker; else kill -HUP "$(cat /var/run/docker.pid)"; fi
    sleep 1
    if ! config_live; then
        log "restarting dockerd (experimental needs a restart)"
        stop_docker
        start_docker
    fi
else
    log "dockerd running"
fi
config_live || die "dockerd runs without experimental=true or runtimes.runsc.path=$RUNTIME_PATH"
log "docker $("$DOCKER" version --format '{{.Server.Version}}') with runtime runsc -> $RUNTIME_PATH"

# ---------------------------------------------------------------------------------------------
# 5b. kernel.pid_max: every thread of a running sandbox takes a pid (~160 for an idle ptrace
# sandbox, docs/operations.md), so the kernel's own default of 32,768 stops a host near 190
# running workspaces. Debian's systemd raises it to 4,194,304 at boot (its
# /usr/lib/sysctl.d/50-pid-max.conf); a host booted without systemd keeps 32,768. Raise it to
# that value when lower, for this boot only (never lowered; kept across reboots by systemd's
# file, or by the operator's own /etc/sysctl.d/ entry).
# ---------------------------------------------------------------------------------------------
PID_MAX=4194304
pid_max_now=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 0)
if [ "$pid_max_now" -lt "$PID_MAX" ]; then
    if echo "$PID_MAX" > /proc/sys/kernel/pid_max 2>/dev/null; then
        log "kernel.pid_max $pid_max_now -> $PID_MAX (Debian's systemd default; this boot only)"
    else
        log "WARNING: kernel.pid_max is $pid_max_now and cannot be raised here:" \
            "at most ~$((pid_max_now / 170)) workspaces can run at once (docs/operations.md)"
    fi
else
    log "kernel.pid_max $pid_max_now"
fi

# ---------------------------------------------------------------------------------------------
# 6. Workspace images
# ---------------------------------------------------------------------------------------------
if [ "$WITH_IMAGES" = 1 ]; then
    DEN_DEBIAN_MIRROR=$MIRROR "$REPO_ROOT/workspace_images/build.sh" "${BUILD_ARGS[@]}"
else
    log "skipping images (--no-images)"
fi
log "done"
