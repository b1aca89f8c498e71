"""File writes inside a workspace on its enforced disk against the storage Den used before.

    .venv/bin/python -m tests.benchmarks.bench_disk [--rounds N] [--mib M] [--files F]
        [--json out.json]

(docs/benchmarks.md, "Disk quota", explains the results.)

Makes three workspaces with the server's own Docker backend (``DockerRuntime.create`` and
``start``, runsc, the same container config, names ``denbench-disk-<random>-*``): ``enforced``,
with ``disk_gb`` enforced as Den does it (a loop-mounted ext4 image under a temporary
directory holding ``/workspace`` and the container's writable layer, the loop device on
direct I/O: server/runtime/disk_quota.py); ``buffered``, the same with the loop device on
buffered I/O (the kernel's default); ``plain``, without (``disk_gb`` 0: a plain local volume
and the engine's overlay2 layer on the host's disk, what every workspace had before). In
each, round by round, rotating which goes first, timed inside the sandbox (``date +%s%N``
around the work, so that the exec's own cost is left out):

- ``write``: M MiB (512) of zeros with ``dd bs=1M conv=fsync``, in ``/workspace`` and in
  ``/var/tmp`` (the root filesystem), then the file removed (untimed);
- ``create``: F (2,000) small files (``echo`` by the shell, no process per file) in a new
  directory, then ``rm -rf`` of it (timed apart: ``delete``).

Prints medians per side and the ratios to plain (for rates, below 1: slower than plain).
The workspaces and images are removed at the end, also after a failure. Nothing asserts
on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import tempfile
from pathlib import Path

from server.runtime.base import WorkspaceSpec, labels_for
from server.runtime.disk_quota import Disks
from server.runtime.docker import DockerRuntime
from server.runtime.docker_specs import container_of

IMAGE = "den/workspace:latest"

WRITE = ("t0=$(date +%s%N); dd if=/dev/zero of={dir}/bench.bin bs=1M count={mib} conv=fsync "
         "2>/dev/null; t1=$(date +%s%N); rm -f {dir}/bench.bin; echo $(( (t1 - t0) / 1000 ))")
CREATE = ("mkdir -p {dir}/bench.d && cd {dir}/bench.d && t0=$(date +%s%N); i=0; "
          "while [ $i -lt {files} ]; do echo x > f$i; i=$((i+1)); done; sync; "
          "t1=$(date +%s%N); cd / && rm -rf {dir}/bench.d; sync; t2=$(date +%s%N); "
          "echo $(( (t1 - t0) / 1000 )) $(( (t2 - t1) / 1000 ))")


class BufferedDisks(Disks):
    """Den's disks with the loop device left on buffered I/O."""

    @staticmethod
    def _direct_io(volume: str, mnt: Path) -> None:
        return None


def spec(prefix: str, side: str, disk_gb: int) -> WorkspaceSpec:
    return WorkspaceSpec(
        workspace_id=side,
        handle={"container": f"{prefix}-{side}", "volume": f"{prefix}-{side}-data"},
        image=IMAGE, runtime="gvisor", cpus=1.0, memory_mb=1024, pids_limit=256,
        hostname=side, labels=labels_for(instance=prefix, workspace_id=side, owner="0"),
        disk_gb=disk_gb)


def run_in(container: str, script: str) -> list[int]:
    out = subprocess.run(["docker", "exec", "-u", "root", container, "sh", "-c", script],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return [int(x) for x in out.split()]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    prefix = f"denbench-disk-{secrets.token_hex(3)}"
    tmp = Path(tempfile.mkdtemp(prefix="denbench-disk-"))
    rt = DockerRuntime(helper_image=IMAGE, disks=Disks(tmp / "disks"))
    buffered = DockerRuntime(helper_image=IMAGE, disks=BufferedDisks(tmp / "disks"))
    sides = {"enforced": spec(prefix, "enforced", 4), "buffered": spec(prefix, "buffered", 4),
             "plain": spec(prefix, "plain", 0)}
    runtimes = {"enforced": rt, "buffered": buffered, "plain": rt}
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in sides}
    try:
        for side, s in sides.items():
            await runtimes[side].create(s)
            await runtimes[side].start(s)
        for r in range(args.rounds):
            order = list(sides)[r % 3:] + list(sides)[:r % 3]
            for side in order:
                name = container_of(sides[side])
                for where, path in (("workspace", "/workspace"), ("root", "/var/tmp")):
                    (us,) = run_in(name, WRITE.format(dir=path, mib=args.mib))
                    samples[side].setdefault(f"write {where} MB/s", []).append(
                        args.mib * 1.048576 / (us / 1e6))
                    create_us, delete_us = run_in(name, CREATE.format(dir=path,
                                                                      files=args.files))
                    samples[side].setdefault(f"create {where} files/s", []).append(
                        args.files / (create_us / 1e6))
                    samples[side].setdefault(f"delete {where} s", []).append(delete_us / 1e6)
    finally:
        for s in sides.values():
            try:
                await rt.destroy(s)
            except Exception as exc:
                print(f"cleanup of {container_of(s)}: {exc}")
        rt.close()
        buffered.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)

    result = {side: {k: statistics.median(v) for k, v in m.items()}
              for side, m in samples.items()}
    print(f"{'measure (median of ' + str(args.rounds) + ')':30} {'enforced':>9} {'buffered':>9}"
          f" {'plain':>9} {'enf/plain':>9} {'buf/plain':>9}")
    for key in result["plain"]:
        a, b, p = (result[side][key] for side in ("enforced", "buffered", "plain"))
        print(f"{key:30} {a:9.2f} {b:9.2f} {p:9.2f} {a / p:9.2f} {b / p:9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "medians": result}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
