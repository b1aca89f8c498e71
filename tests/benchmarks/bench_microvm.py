"""The microVM backend's boot and exec latency, against the bare pieces doing the same work in
the same run (docs/benchmarks.md, "MicroVM backend"):

* boot: Den's create + start + first exec (``true`` through the agent) against QEMU booting
  the same kernel and initramfs with nothing else (the probe guest: boot to init, power off);
* exec round trip: ``exec true`` through the agent against the agent's ``ping`` on the same
  session (the virtio-serial round trip with no process started).

Runs on the runtime directly (no HTTP), needs scripts/setup-microvm.sh's files::

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

from server.runtime.base import ExecRequest, WorkspaceSpec, labels_for
from server.runtime.microvm.argv import probe_argv
from server.runtime.microvm.backend import MicroVmRuntime


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f} ms (n={len(xs)})"


async def main(args: argparse.Namespace) -> None:
    vms = Path(tempfile.mkdtemp(prefix="dvm-", dir="/tmp"))
    rt = MicroVmRuntime(boot_dir=args.dir, vms_dir=vms, image="den/workspace:latest",
                        prefix=f"denbench-{secrets.token_hex(2)}")
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
    finally:
        shutil.rmtree(vms, ignore_errors=True)
    accel = rt.accelerator.upper()
    print(f"microVM backend, {accel}; load {Path('/proc/loadavg').read_text().split()[:3]}")
    print(f"boot to first exec: raw QEMU boot {_ms(raw_boot)} | Den {_ms(den_boot)} | "
          f"{statistics.median(den_boot) / statistics.median(raw_boot):.2f}x")
    print(f"exec round trip:    agent ping {_ms(ping)} | exec true {_ms(exec_true)} | "
          f"{statistics.median(exec_true) / statistics.median(ping):.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--dir", type=Path, default=Path("/var/lib/den/microvm"))
    asyncio.run(main(p.parse_args()))
