"""The microVM network's pure builders (server/runtime/microvm/net.py) and its place in
QEMU's command line."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from server.runtime.errors import EngineError
from server.runtime.microvm import net
from server.runtime.microvm.argv import BootFiles, VmFiles, qemu_argv

NET = net.VmNetwork.named("dentest-net", "10.88.7.0/29")


def test_the_bridge_and_its_gateway() -> None:
    assert NET.interface.startswith("den-") and len(NET.interface) <= 15
    assert NET.interface != net.VmNetwork.named("dentest-other", "10.88.7.0/29").interface
    assert NET.gateway == "10.88.7.1"
    with pytest.raises(ValueError):
        net.VmNetwork.named("x", "10.88.7.1/29")  # not a network address


def test_tap_names_fit_and_differ() -> None:
    names = {net.tap_name(f"den-vm-{i}") for i in range(1000)}
    assert len(names) == 1000
    assert all(len(n) <= 15 and n.startswith("dvt") for n in names)
    assert net.tap_name("den-vm-a") == net.tap_name("den-vm-a")


def test_macs_are_local_unicast_and_follow_the_address() -> None:
    assert net.mac_for("10.88.7.2") == "02:de:0a:58:07:02"
    assert net.mac_for("10.88.7.3") != net.mac_for("10.88.7.2")


def test_addresses_skip_the_gateway_and_the_used_ones() -> None:
    assert net.pick_address(NET, []) == "10.88.7.2"
    assert net.pick_address(NET, ["10.88.7.2", "10.88.7.4"]) == "10.88.7.3"
    with pytest.raises(EngineError, match="DEN_MICROVM_SUBNET"):
        net.pick_address(NET, [f"10.88.7.{i}" for i in range(2, 7)])


def test_a_vms_address_is_kept_in_its_record(tmp_path: Path) -> None:
    dirs = [VmFiles(tmp_path / f"vm{i}") for i in range(3)]
    for files in dirs:
        files.dir.mkdir()
        files.record.write_text(json.dumps({"labels": {"x": "y"}}))
    assert net.address_of(dirs[0], NET) == "10.88.7.2"
    assert net.address_of(dirs[1], NET) == "10.88.7.3"
    assert net.address_of(dirs[0], NET) == "10.88.7.2"  # kept: a resume's is the same
    assert json.loads(dirs[0].record.read_text()) == {"labels": {"x": "y"},
                                                      "address": "10.88.7.2"}
    # A record from another subnet (DEN_MICROVM_SUBNET changed) gets a new address.
    dirs[2].record.write_text(json.dumps({"address": "10.1.2.3"}))
    assert ipaddress.IPv4Address(net.address_of(dirs[2], NET)) in NET.subnet


def test_qemu_gets_the_tap_and_the_guest_its_address() -> None:
    nic = net.netdev_argv("10.88.7.2")
    assert nic == ["-netdev", "tap,id=net0",
                   "-device", "virtio-net-device,netdev=net0,mac=02:de:0a:58:07:02"]
    # QEMU gets the TAP Den made as a descriptor (it runs in a network namespace of its own)
    assert net.with_tap(["qemu", *nic, "-daemonize"], 17) == [
        "qemu", "-netdev", "tap,id=net0,fd=17",
        "-device", "virtio-net-device,netdev=net0,mac=02:de:0a:58:07:02", "-daemonize"]
    argv = net.guest_setup_argv(NET, "10.88.7.2")
    assert argv[:2] == ["sh", "-c"] and "ip -batch -" in argv[2]
    assert argv[3:] == ["den-net", "link set dev lo up\nlink set dev eth0 down\n"
                        "link set dev eth0 address 02:de:0a:58:07:02\naddr flush dev eth0\n"
                        "addr add 10.88.7.2/29 dev eth0\nlink set dev eth0 up\n"
                        "route replace default via 10.88.7.1 dev eth0", "10.88.7.1"]
    boot = BootFiles.under(Path("/b"))
    plain = qemu_argv("qemu", boot, VmFiles(Path("/v/x")), accel="tcg", cpus=1, memory_mb=512,
                      hostname="h")
    assert not net.has_nic(plain)
    assert net.has_nic([*plain, *net.netdev_argv("10.88.7.2")])


def test_the_network_lists_only_this_servers_running_vms(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers with other engine prefixes may share the VMs' directory: their VMs are not
    this server's firewall members (only its own running VMs with a TAP are)."""
    from server.runtime.microvm import backend, process

    vms = tmp_path / "vms"
    names = ["den-vm-ws1", "den-vm-ws2-ab12", "den-vm-ws3", "other-vm-ws4", "den-snap-sn1"]
    for i, name in enumerate(names):
        files = VmFiles(vms / name)
        files.dir.mkdir(parents=True)
        files.record.write_text(json.dumps({"address": f"10.88.7.{i + 2}"}))
    stopped = "den-vm-ws3"
    monkeypatch.setattr(net, "ensure_bridge", lambda _net: None)
    monkeypatch.setattr(net, "link_exists", lambda tap: tap != net.tap_name(stopped))
    monkeypatch.setattr(process, "running",
                        lambda files: None if files.dir.name == stopped else 42)
    rt = backend.MicroVmRuntime(boot_dir=tmp_path, vms_dir=vms, image="img", prefix="den",
                                network=NET)
    info = rt._network_info(NET)
    assert info.addresses == {"den-vm-ws1": "10.88.7.2", "den-vm-ws2-ab12": "10.88.7.3"}
    assert info.ports == {n: net.tap_name(n) for n in info.addresses}
    assert net.serves("den", "den-vm-ws1") and not net.serves("den", "dentest-vm-ws1")
