"""MicroVM networking: a bridge of Den's own, a TAP per VM, and the guest's address.

Each VM with a network (its policy is not ``none``) gets a virtio-net device backed by a TAP
that Den creates in the host's network namespace (:func:`open_tap`) and hands to QEMU as a
descriptor (``-netdev tap,fd=N``: QEMU itself runs in a network namespace of its own,
jail.py). The TAP is not persistent: the kernel removes it when the last descriptor closes,
and Den closes its own once QEMU runs, so whatever ends QEMU (a stop, a pause, ``kill -9``)
removes its TAP: no TAP outlives its VM. Den then puts the TAP on its bridge as an
isolated port (no frames to other isolated ports: VMs never meet at layer 2), and the host
firewall (server/network/firewall.py, the same rules as gVisor workspaces) judges every
packet by the TAP it came in by and the VM's address. Every VM has a NIC, ``none`` ones too
(the firewall passes nothing of theirs): ``microvm`` has no hotplug, and a policy changed on
a running VM must apply at once.

Addresses: one per VM directory, kept in its ``vm.json``, so a resumed VM (whose memory holds
its configured address) gets the same one, and a fork or a restore (a new directory) a new
one; the MAC follows from the address. The guest is configured through the agent once it
answers (:func:`guest_setup_argv`, run as root): on a cold boot, and on a VM woken from
another VM's memory, which holds its origin's address and MAC until then.

Pure builders first, then a thin blocking I/O shell (``ip``), called off the event loop.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import struct
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from server.network.firewall import bridge_name
from server.runtime.errors import EngineError
from server.runtime.microvm import disks
from server.runtime.microvm.argv import VmFiles

GUEST_IFACE = "eth0"  # the guest kernel's name of its only NIC (no udev renaming)
NETDEV_ID = "net0"
# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


@dataclass(frozen=True)
class VmNetwork:
    """The host's bridge for microVMs."""

    interface: str
    subnet: ipaddress.IPv4Network

    @classmethod
    def named(cls, network: str, subnet: str) -> VmNetwork:
        return cls(interface=bridge_name(f"{network}-vm"),
                   subnet=ipaddress.IPv4Network(subnet, strict=True))

    @property
    def gateway(self) -> str:
        """The host's address on the bridge: the subnet's first (Den's DNS forwarder)."""
        return str(self.subnet.network_address + 1)


def tap_name(vm: str) -> str:
    """The VM's TAP (at most 15 characters, from its directory's name)."""
    return "dvt" + hashlib.sha256(vm.encode()).hexdigest()[:11]


def mac_for(address: str) -> str:
    """A locally administered unicast MAC from the IPv4 address (unique as the address is)."""
    octets = ipaddress.IPv4Address(address).packed
    return "02:de:" + ":".join(f"{b:02x}" for b in octets)


def pick_address(net: VmNetwork, used: Iterable[str]) -> str:
    """The lowest address of the subnet that is not the gateway and not ``used``."""
    taken = set(used) | {net.gateway}
    for host in net.subnet.hosts():
        if str(host) not in taken:
            return str(host)
    raise EngineError(f"no free address left for a microVM in {net.subnet} "
                      "(DEN_MICROVM_SUBNET)")


def netdev_argv(address: str) -> list[str]:
    """QEMU's arguments for the VM's NIC; its TAP's descriptor is added at launch
    (:func:`with_tap`)."""
    return ["-netdev", f"tap,id={NETDEV_ID}",
            "-device", f"virtio-net-device,netdev={NETDEV_ID},mac={mac_for(address)}"]


def with_tap(argv: list[str], fd: int) -> list[str]:
    """``argv`` whose NIC is the TAP open as descriptor ``fd`` (inherited by QEMU)."""
    at = argv.index("-netdev") + 1
    return [*argv[:at], f"tap,id={NETDEV_ID},fd={int(fd)}", *argv[at + 1:]]


def serves(prefix: str, vm: str) -> bool:
    """Whether the VM directory ``vm`` is one of this server's (its engine prefix's): Den
    servers with other prefixes may share the VMs' directory (``DEN_MICROVM_DIR``), and
    their VMs are on their own bridges, none of this server's firewall's business (seen: a
    server's rules named another's VMs, and kept a deleted one's until its next sync)."""
    return vm.startswith(f"{prefix}-vm-")


def has_nic(argv: Iterable[str]) -> bool:
    """Whether a QEMU command line gives the VM a NIC (a checkpoint's device set)."""
    return "-netdev" in argv


def guest_setup_argv(net: VmNetwork, address: str) -> list[str]:
    """What the guest runs as root to take its address, route and resolver (idempotent:
    a VM woken from another's memory replaces its origin's MAC and address). One ``ip``
    process for all of it (``-batch``, stopping at the first error): under TCG each
    process the guest starts costs a few hundred ms on a loaded host."""
    commands = "\n".join([
        "link set dev lo up", f"link set dev {GUEST_IFACE} down",
        f"link set dev {GUEST_IFACE} address {mac_for(address)}",
        f"addr flush dev {GUEST_IFACE}",
        f"addr add {address}/{net.subnet.prefixlen} dev {GUEST_IFACE}",
        f"link set dev {GUEST_IFACE} up",
        f"route replace default via {net.gateway} dev {GUEST_IFACE}"])
    script = ('printf "%s\\n" "$1" | ip -batch - && '
              'printf "nameserver %s\\n" "$2" > /etc/resolv.conf')
    return ["sh", "-c", script, "den-net", commands, net.gateway]


# --- I/O: the host's links (blocking) -------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"{' '.join(argv)} failed: {exc}") from exc
    if check and done.returncode != 0:
        raise EngineError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return done


def open_tap(vm: str) -> int:
    """Create the VM's TAP in the host's network namespace and return its descriptor
    (close-on-exec: only the QEMU it is passed to inherits it). Not persistent: it goes
    when its last descriptor closes. Fails if the TAP exists (another QEMU holds it)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise EngineError(f"cannot open /dev/net/tun for a microVM's NIC: {exc}") from exc
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", tap_name(vm).encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise EngineError(f"cannot create the TAP {tap_name(vm)} of {vm}: {exc}") from exc
    return fd


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def ensure_bridge(net: VmNetwork) -> None:
    """Den's bridge with the gateway's address and a MAC of its own, up (idempotent). A
    bridge left to itself takes the lowest MAC of its ports, which changes as VMs come and
    go, and a resumed guest's ARP cache would keep the old one: its packets to the gateway
    would go nowhere (seen)."""
    if not link_exists(net.interface):
        _ip("link", "add", net.interface, "type", "bridge", check=False)
        if not link_exists(net.interface):
            raise EngineError(f"cannot create the microVMs' bridge {net.interface}")
    mac = mac_for(net.gateway)
    try:
        current = Path("/sys/class/net", net.interface, "address").read_text().strip()
    except OSError:
        current = ""
    if current != mac:
        _ip("link", "set", "dev", net.interface, "address", mac)
    addr = f"{net.gateway}/{net.subnet.prefixlen}"
    if addr not in _ip("-o", "-4", "addr", "show", "dev", net.interface).stdout:
        _ip("addr", "add", addr, "dev", net.interface)
    _ip("link", "set", net.interface, "up")


def attach(net: VmNetwork, vm: str, address: str) -> None:
    """Put the VM's TAP (:func:`open_tap`, held by its QEMU) on the bridge, up, as an
    isolated port that learns no MAC and gets no unknown unicast: frames for the VM's MAC
    (``address``'s) go to it by a static entry. A VM woken from another's memory sends with
    its origin's MAC until it takes its own, and a root user in a guest can send with any:
    neither moves another VM's traffic to its port."""
    tap = tap_name(vm)
    _ip("link", "set", "dev", tap, "master", net.interface)
    _ip("link", "set", "dev", tap, "type", "bridge_slave", "isolated", "on", "learning", "off",
        "flood", "off")
    _run(["bridge", "fdb", "replace", mac_for(address), "dev", tap, "master", "static"])
    _ip("link", "set", "dev", tap, "up")


def remove_bridge(net: VmNetwork) -> None:
    """Remove the bridge (uninstall, tests); a missing one is fine."""
    if link_exists(net.interface):
        _ip("link", "del", net.interface, check=False)


_ASSIGN = threading.Lock()  # one assignment at a time: two VMs never pick the same address


def address_of(files: VmFiles, net: VmNetwork) -> str:
    """The VM's address: the one its record keeps, else the lowest free one of the subnet
    (among the records of the VMs next to it), written into its record."""
    with _ASSIGN:
        record = disks.read_record(files) or {}
        kept = record.get("address")
        if isinstance(kept, str) and _within(kept, net):
            return kept
        used = []
        for d in files.dir.parent.iterdir():
            other = disks.read_record(VmFiles(d)) if d != files.dir else None
            if other and isinstance(other.get("address"), str):
                used.append(str(other["address"]))
        address = pick_address(net, used)
        disks.write_record(files, {**record, "address": address})
        return address


def recorded_address(files: VmFiles) -> str | None:
    """The address the VM's record keeps (None: none yet)."""
    kept = (disks.read_record(files) or {}).get("address")
    return kept if isinstance(kept, str) else None


def _within(address: str, net: VmNetwork) -> bool:
    try:
        return ipaddress.IPv4Address(address) in net.subnet and address != net.gateway
    except ValueError:
        return False
