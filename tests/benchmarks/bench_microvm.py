"""The microVM backend's boot and exec latency, against the bare pieces doing the same work in
the same run (docs/benchmarks.md, "MicroVM backend"):

* boot: Den's create + start + first exec (``true`` through the agent) against QEMU booting
  the same kernel and initramfs with nothing else (the probe guest: boot to init, power off);
* exec round trip: ``exec true`` through the agent against the agent's ``ping`` on the same
  session (the virtio-serial round trip with no process started);
* sleep and forks, the same steps on the microVM backend and on the Docker backend (gVisor),
  side by side on one idle 512 MB workspace each: pause (memory saved, the sandbox ended),
  resume -> first exec, the memory snapshot's size (its saved memory), fork -> first exec
  (a new workspace from that memory snapshot: disks copied, memory loaded). The issue's goals
  for the microVM: pause <= 1 s, resume -> first exec <= 0.5 s, fork <= 1 s.

Runs on the runtimes directly (no HTTP), needs scripts/setup-microvm.sh's files and, for the
gVisor side, the Docker engine (``--no-gvisor`` leaves it out)::

    python -m tests.benchmarks.bench_microvm [--rounds 3] [--samples 20] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from server.config import Settings
from server.runtime.base import (
    Checkpoints,
    DiskSnapshots,
    ExecRequest,
    Runtime,
    WorkspaceSpec,
    labels_for,
)
from server.runtime.microvm import vmusers
from server.runtime.microvm.argv import probe_argv
from server.runtime.microvm.backend import MicroVmRuntime
from server.runtime.microvm.net import VmNetwork, remove_bridge

CHECKPOINT = "den-pause"  # server.workspaces.handles.CHECKPOINT


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f} ms (n={len(xs)})"


def _mb(xs: list[float]) -> str:
    return f"{statistics.median(xs) / 2**20:.0f} MB"


async def sleep_and_fork(rt: Runtime, *, runtime: str, image: str, prefix: str, rounds: int,
                         tmp: Path) -> dict[str, list[float]]:
    """Pause, resume -> first exec, memory snapshot size, fork -> first exec on ``rt``."""
    assert isinstance(rt, Checkpoints) and isinstance(rt, DiskSnapshots)
    got: dict[str, list[float]] = {k: [] for k in ("pause", "resume", "memory", "fork")}
    made: list[WorkspaceSpec] = []
    snaps = []

    def spec(ws: str, *, image: str = image) -> WorkspaceSpec:
        return WorkspaceSpec(workspace_id=ws, handle=rt.new_handle(ws), image=image,
                             runtime=runtime, cpus=1, memory_mb=512, pids_limit=1024,
                             hostname=ws, labels=labels_for(instance=prefix, workspace_id=ws,
                                                            owner="bench"), disk_gb=1)

    try:
        src = spec("s0")
        made.append(src)
        await rt.create(src)
        await rt.start(src)
        assert (await rt.exec(src, ExecRequest(argv=["true"]))).exit_code == 0
        for i in range(rounds):
            await asyncio.sleep(1)  # idle, as the reaper finds it
            t = time.monotonic()
            await rt.pause(src, checkpoint=CHECKPOINT)
            got["pause"].append(time.monotonic() - t)
            snap = rt.new_snapshot(f"bs{i}", labels_for(instance=prefix, workspace_id="",
                                                        owner="bench"))
            snaps.append(snap)
            await rt.snapshot(src, snap)
            got["memory"].append(await rt.export_checkpoint(
                src, checkpoint=CHECKPOINT, dest=tmp / f"mem{i}"))
            t = time.monotonic()
            await rt.resume(src, checkpoint=CHECKPOINT)
            assert (await rt.exec(src, ExecRequest(argv=["true"]))).exit_code == 0
            got["resume"].append(time.monotonic() - t)
            fork = spec(f"f{i}", image=snap.image)  # Docker: the snapshot's committed image
            made.append(fork)
            t = time.monotonic()
            await rt.load_snapshot(fork, snap)
            await rt.import_checkpoint(fork, checkpoint=CHECKPOINT, src=tmp / f"mem{i}")
            await rt.resume(fork, checkpoint=CHECKPOINT)
            assert (await rt.exec(fork, ExecRequest(argv=["true"]))).exit_code == 0
            got["fork"].append(time.monotonic() - t)
            await rt.destroy(fork)
    finally:
        for s in made:
            await rt.destroy(s)
        for snap in snaps:
            await rt.delete_snapshot(snap)
    return got


async def gvisor_side(rounds: int, tmp: Path) -> dict[str, list[float]]:
    from server import backends
    from server.config import Settings

    prefix = f"denbench-{secrets.token_hex(2)}"
    settings = Settings(data_dir=tmp / "den", engine_prefix=prefix, network_isolation=False,
                        enforce_disk_gb=False, gpus="none")
    rt = backends.docker(settings).runtime
    try:
        return await sleep_and_fork(rt, runtime="gvisor", image=settings.default_image,
                                    prefix=prefix, rounds=rounds, tmp=tmp)
    finally:
        close = getattr(rt, "close", None)
        if close is not None:
            close()


async def main(args: argparse.Namespace) -> None:
    vms = Path(tempfile.mkdtemp(prefix="dvm-", dir="/tmp"))
    defaults = Settings()  # each QEMU as a uid of its own, as a server runs them
    prefix = f"denbench-{secrets.token_hex(2)}"
    # --network: each VM gets its NIC on a bridge of the bench's own (no firewall: the
    # guest's configuration is what a boot, a resume and a fork pay for).
    vm_net = VmNetwork.named(prefix, args.network) if args.network else None
    rt = MicroVmRuntime(boot_dir=args.dir, vms_dir=vms, image="den/workspace:latest",
                        prefix=prefix, network=vm_net,
                        uids=vmusers.UidRange(defaults.microvm_uid_base,
                                              defaults.microvm_uid_count))
    await rt.check()
    raw_boot, den_boot, ping, exec_true = [], [], [], []
    try:
        for i in range(args.rounds):
            t = time.monotonic()
            out = subprocess.run(probe_argv(rt.qemu, rt.boot, accel=rt.accelerator,
                                            tsc_khz=rt.tsc_khz),
                                 capture_output=True, timeout=120, check=True)
            assert b"den-probe-ok" in out.stdout
            raw_boot.append(time.monotonic() - t)
            ws = f"b{i}"
            spec = WorkspaceSpec(workspace_id=ws, handle=rt.new_handle(ws),
                                 image="den/workspace:latest", runtime="microvm", cpus=1,
                                 memory_mb=512, pids_limit=1024, hostname=ws,
                                 labels=labels_for(instance="bench", workspace_id=ws,
                                                   owner="bench"), disk_gb=1)
            t = time.monotonic()
            await rt.create(spec)
            await rt.start(spec)
            r = await rt.exec(spec, ExecRequest(argv=["true"]))
            den_boot.append(time.monotonic() - t)
            assert r.exit_code == 0, r
            session = await rt.agent(spec)
            assert session is not None
            for _ in range(args.samples):
                t = time.monotonic()
                await session.request({"op": "ping"}, timeout_s=30)
                ping.append(time.monotonic() - t)
                t = time.monotonic()
                await rt.exec(spec, ExecRequest(argv=["true"]))
                exec_true.append(time.monotonic() - t)
            await rt.destroy(spec)
        tmp = vms / "bench"
        tmp.mkdir()
        vm_sleep = await sleep_and_fork(rt, runtime="microvm", image=rt.image,
                                        prefix=rt.prefix, rounds=args.rounds, tmp=tmp)
        gv_sleep = None if args.no_gvisor else await gvisor_side(args.rounds, tmp)
    finally:
        shutil.rmtree(vms, ignore_errors=True)
        if vm_net is not None:
            remove_bridge(vm_net)
    accel = rt.accelerator.upper()
    nic = "a NIC per VM" if vm_net else "no NIC"
    print(f"microVM backend, {accel}, {nic}; load {Path('/proc/loadavg').read_text().split()[:3]}")
    print(f"boot to first exec: raw QEMU boot {_ms(raw_boot)} | Den {_ms(den_boot)} | "
          f"{statistics.median(den_boot) / statistics.median(raw_boot):.2f}x")
    print(f"exec round trip:    agent ping {_ms(ping)} | exec true {_ms(exec_true)} | "
          f"{statistics.median(exec_true) / statistics.median(ping):.2f}x")
    rows = (("pause (idle 512 MB)", "pause", _ms), ("resume -> first exec", "resume", _ms),
            ("memory snapshot size", "memory", _mb), ("fork -> first exec", "fork", _ms))
    for title, key, fmt in rows:
        vm = f"microVM ({accel}) {fmt(vm_sleep[key])}"
        if gv_sleep is None:
            print(f"{title + ':':22} {vm}")
            continue
        ratio = statistics.median(vm_sleep[key]) / statistics.median(gv_sleep[key])
        print(f"{title + ':':22} {vm} | gVisor {fmt(gv_sleep[key])} | {ratio:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--dir", type=Path, default=Path("/var/lib/den/microvm"))
    p.add_argument("--no-gvisor", action="store_true", help="the microVM side only")
    p.add_argument("--network", default="", metavar="CIDR",
                   help="give each VM a NIC on a bridge with this subnet (e.g. 10.88.250.0/24)")
    asyncio.run(main(p.parse_args()))
