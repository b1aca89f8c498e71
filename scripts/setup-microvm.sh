#!/usr/bin/env bash
# Host setup for the microVM backend (DEN_BACKEND=microvm, docs/microvm.md). Idempotent; run
# as root; `make test` runs it (the microVM engine tests need it). Builds, under DIR (default
# <data_dir>/microvm, i.e. /var/lib/den/microvm; the backend reads DEN_MICROVM_DIR):
#
#   vmlinux          the Debian kernel, uncompressed (PVH boot: the xz vmlinuz is slow to
#                    unpack under TCG)
#   initramfs.cpio   busybox-static and the virtio/ext4 modules: mounts the root disk and
#                    /workspace, then hands over to Den's agent as PID 1
#   rootfs.ext4      the workspace image (docker export of DEN_IMAGE) with the agent at
#                    /.den/den-agent; shared read-only, each VM writes a qcow2 overlay on it.
#                    A link to rootfs-<build>.ext4: a rebuild makes a new file, and the VMs
#                    made on an older one keep it (remove those by hand once no VM uses them)
#   VERSION          what was built from what (the backend checks that the three exist)
#
# Only Debian packages are installed (qemu-system-x86, qemu-utils, linux-image-amd64,
# busybox-static, e2fsprogs, kmod); nothing else is downloaded.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-${DEN_MICROVM_DIR:-${DEN_DATA_DIR:-/var/lib/den}/microvm}}
IMAGE=${DEN_IMAGE:-den/workspace:latest}
AGENT=${DEN_AGENT_BINARY:-$ROOT/build/agent/den-agent}
MODULES="virtio_mmio virtio_blk virtio_console ext4 virtio_net"
FORCE=${FORCE:-0}  # FORCE=1 rebuilds everything

CLEAN=()  # temporary directories and containers, removed at exit
cleanup() {
    local x
    for x in "${CLEAN[@]}"; do
        case "$x" in
            /*) rm -rf "$x" ;;
            *) docker rm -f "$x" >/dev/null 2>&1 || true ;;
        esac
    done
}
trap cleanup EXIT

log() { printf 'setup-microvm: %s\n' "$*" >&2; }

packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    [ -x /bin/busybox ] && /bin/busybox --list | grep -qx switch_root || missing+=(busybox-static)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    command -v modprobe >/dev/null || missing+=(kmod)
    ls /boot/vmlinuz-*-amd64 >/dev/null 2>&1 || missing+=(linux-image-amd64)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# The newest installed Debian kernel.
kernel_version() {
    ls /boot/vmlinuz-*-amd64 | sed 's|/boot/vmlinuz-||' | sort -V | tail -1
}

# vmlinuz is a bzImage with an xz payload: find the xz magic and decompress from there (what
# the kernel's scripts/extract-vmlinux does), keeping the first candidate that is an ELF.
extract_vmlinux() {
    local src=$1 dst=$2 off
    for off in $(grep -abo $'\xfd7zXZ\x00' "$src" | cut -d: -f1); do
        # xz complains about the bzImage's bytes after the stream: judge by the output.
        tail -c +$((off + 1)) "$src" | xz -dc 2>/dev/null > "$dst.tmp" || true
        if [ "$(head -c 4 "$dst.tmp" | od -An -c | tr -d ' ')" = "177ELF" ]; then
            mv "$dst.tmp" "$dst"
            return 0
        fi
    done
    rm -f "$dst.tmp"
    log "no xz-compressed ELF kernel found in $src"
    return 1
}

build_initramfs() {
    local kver=$1 out=$2 work
    work=$(mktemp -d)
    CLEAN+=("$work")
    mkdir -p "$work"/{bin,dev,proc,sys,newroot,lib/modules}
    cp /bin/busybox "$work/bin/busybox"
    # Modules in dependency order, decompressed (busybox insmod reads plain .ko).
    : > "$work/modules"
    local m
    for m in $MODULES; do modprobe -S "$kver" --show-depends "$m"; done \
        | awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++' | while read -r ko; do
        name=$(basename "$ko"); name=${name%.xz}
        case "$ko" in
            *.xz) xz -dc "$ko" > "$work/lib/modules/$name" ;;
            *) cp "$ko" "$work/lib/modules/$name" ;;
        esac
        echo "$name" >> "$work/modules"
    done
    cat > "$work/init" <<'EOF'
#!/bin/busybox sh
# Den's microVM init: modules, the root disk and /workspace, then the agent as PID 1 with
# the virtio-serial port named den.agent (the host's agent socket) as its channel.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
if /bin/busybox grep -q den.probe=1 /proc/cmdline; then  # the backend's check for KVM
    echo den-probe-ok > /dev/console; /bin/busybox poweroff -f
fi
# No IPv6 in the guest (as in gVisor workspaces): set before virtio_net makes its interface.
for f in /proc/sys/net/ipv6/conf/default/disable_ipv6 /proc/sys/net/ipv6/conf/all/disable_ipv6; do
    [ -e $f ] && echo 1 > $f
done
for m in $(/bin/busybox cat /modules); do /bin/busybox insmod /lib/modules/$m 2>/dev/null; done
fail() { echo "den-init: $*" > /dev/kmsg; /bin/busybox sleep 1; /bin/busybox poweroff -f; }
# The agent's port: /dev/vportNpM, N the virtio device's index; found by its name.
agent_port() {
    for p in /sys/class/virtio-ports/vport*; do
        [ "$(/bin/busybox cat "$p/name" 2>/dev/null)" = den.agent ] \
            && echo "/dev/${p##*/}" && return 0
    done
    return 1
}
n=0
until root=$(/bin/busybox findfs LABEL=den-root 2>/dev/null) && \
      ws=$(/bin/busybox findfs LABEL=den-workspace 2>/dev/null) && port=$(agent_port) && \
      [ -e "$port" ]; do
    n=$((n + 1)); [ $n -gt 300 ] && fail "disks or agent port missing"
    /bin/busybox usleep 20000
done
/bin/busybox mount -t ext4 "$root" /newroot || fail "cannot mount the root disk"
/bin/busybox mkdir -p /newroot/workspace /newroot/dev /newroot/proc /newroot/sys /newroot/tmp
/bin/busybox mount -t ext4 -o nodev "$ws" /newroot/workspace || fail "cannot mount /workspace"
/bin/busybox hostname "$(/bin/busybox sed -n 's/.*den.hostname=\([^ ]*\).*/\1/p' /proc/cmdline)"
# The workspace's process limit (den.pids=N on the kernel command line): RLIMIT_NPROC for
# every process of the guest, as Docker's nproc ulimit is for a container's; root is exempt.
pids=$(/bin/busybox sed -n 's/.*den.pids=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$pids" ] && ulimit -u "$pids"
# The loopback interface, as every container has it up: servers on 127.0.0.1 in the guest
# (previews, ssh -L, the agent's connect) are reached through it.
/bin/busybox ip link set lo up || fail "cannot bring the loopback interface up"
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox mount --move /proc /newroot/proc
/bin/busybox mount --move /sys /newroot/sys
/bin/busybox mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp
/bin/busybox mkdir -p /newroot/dev/pts /newroot/dev/shm
/bin/busybox mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts
/bin/busybox mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/dev/shm
# The agent reads the port in its stdio mode: it outlives the host's connections. A port
# opens once (EBUSY after): stdin and stdout share one read-write descriptor. /dev has moved
# under /newroot by now.
export DEN_AGENT_STDIO=1 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec /bin/busybox switch_root /newroot /.den/den-agent init -- /usr/local/bin/den-init \
    <>"/newroot$port" >&0 2>/newroot/dev/console
EOF
    chmod 0755 "$work/init"
    (cd "$work" && find . | cpio -o -H newc --quiet) > "$out.tmp"
    mv "$out.tmp" "$out"
}

build_rootfs() {
    local out=$1 work cid
    work=$(mktemp -d)
    CLEAN+=("$work")
    cid=$(docker create --label den.role=microvm-setup "$IMAGE")
    CLEAN+=("$cid")
    mkdir "$work/root"
    docker export "$cid" | tar -x -C "$work/root" --numeric-owner
    mkdir -p "$work/root/.den" "$work/root/workspace"
    install -m 0755 "$AGENT" "$work/root/.den/den-agent"
    # No engine here: the VM's kernel is its own, /etc files the engine would bind are ours.
    echo "127.0.0.1 localhost" > "$work/root/etc/hosts"
    : > "$work/root/etc/resolv.conf"
    local mb
    mb=$(( $(du -sm "$work/root" | cut -f1) * 13 / 10 + 256 ))
    rm -f "$out.tmp"
    mkfs.ext4 -q -L den-root -d "$work/root" "$out.tmp" "${mb}M"
    mv "$out.tmp" "$out"
}

# The system user QEMU runs as once a VM is set up when VMs have no uids of their own
# (DEN_MICROVM_UID_BASE=0; DEN_MICROVM_USER, QEMU's -runas): no login, no home; in the kvm
# group where there is one (/dev/kvm).
VM_USER=${DEN_MICROVM_USER-den-vm}
vm_user() {
    [ -n "$VM_USER" ] || return 0
    if ! getent passwd "$VM_USER" >/dev/null; then
        log "system user $VM_USER"
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
            --user-group "$VM_USER"
    fi
    if getent group kvm >/dev/null && ! id -nG "$VM_USER" | tr ' ' '\n' | grep -qx kvm; then
        usermod -aG kvm "$VM_USER"
    fi
}

main() {
    packages
    vm_user
    mkdir -p "$DIR"
    local kver
    kver=$(kernel_version)
    if [ ! -x "$AGENT" ]; then
        log "no agent at $AGENT: run scripts/build-agent.sh first"
        exit 1
    fi
    local base="kernel=$kver image=$(docker image inspect -f '{{.Id}}' "$IMAGE") agent=$(sha256sum "$AGENT" | cut -c1-16)"
    # This script's own hash too: a change to the initramfs's init rebuilds it (the root
    # filesystem's name stays that of the kernel, image and agent: it is not rebuilt).
    local want
    want="$base script=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
    if [ "$FORCE" != 1 ] && [ -f "$DIR/VERSION" ] && [ "$(cat "$DIR/VERSION")" = "$want" ] \
            && [ -f "$DIR/vmlinux" ] && [ -f "$DIR/initramfs.cpio" ] && [ -f "$DIR/rootfs.ext4" ]; then
        log "up to date in $DIR ($want)"
        return 0
    fi
    log "kernel $kver -> $DIR/vmlinux"
    extract_vmlinux "/boot/vmlinuz-$kver" "$DIR/vmlinux"
    log "initramfs -> $DIR/initramfs.cpio"
    build_initramfs "$kver" "$DIR/initramfs.cpio"
    # Each build has a file of its own, and rootfs.ext4 links to the newest: the overlays of
    # existing VMs name the file they were made on, which must never change under them.
    local rootfs
    rootfs="rootfs-$(echo "$base" | sha256sum | cut -c1-12).ext4"
    if [ ! -f "$DIR/$rootfs" ]; then
        log "root filesystem from $IMAGE -> $DIR/$rootfs"
        build_rootfs "$DIR/$rootfs"
        chmod 0444 "$DIR/$rootfs"
    fi
    ln -sfn "$rootfs" "$DIR/rootfs.ext4"
    echo "$want" > "$DIR/VERSION"
    log "done: $want"
}

main "$@"
