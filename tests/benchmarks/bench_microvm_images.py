"""Converting an engine image into a microVM root filesystem (server/runtime/microvm/images.py)
against the raw recipe doing the same work in the same run (docs/benchmarks.md, "MicroVM
backend"): ``docker create``, ``docker export | tar -x``, ``mkfs.ext4 -d`` from the shell,
as scripts/setup-microvm.sh does. Den's conversion adds the image inspect, the lock, the
agent read out of the setup's root filesystem and the guest files.

Each round builds a fresh image FROM the default one (a marker file: a new id, so nothing is
cached), converts it both ways (the order alternating between rounds: the first export of a
round reads the layers cold), and removes both files and the image::

    python -m tests.benchmarks.bench_microvm_images [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from server.runtime.microvm.images import RootImages

BASE = "den/workspace:latest"


def _raw(image: str, work: Path) -> None:
    root = work / "root"
    root.mkdir()
    cid = subprocess.run(["docker", "create", image], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        subprocess.run(f"docker export {cid} | tar -x -C {root} --numeric-owner", shell=True,
                       check=True)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)
    mb = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True,
                            check=True).stdout.split()[0]) * 13 // 10 + 256
    subprocess.run(["mkfs.ext4", "-q", "-L", "den-root", "-d", str(root),
                    str(work / "raw.ext4"), f"{mb}M"], check=True, capture_output=True)


def _settle(images_dir: Path) -> None:
    """Den removes the unpacked tree after the base is made, in the background: wait for it
    here, so that it does not slow the next measurement."""
    deadline = time.monotonic() + 120
    while list(images_dir.glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/lib/den/microvm"))
    args = parser.parse_args()
    den: list[float] = []
    raw: list[float] = []
    with tempfile.TemporaryDirectory(prefix="dentest-bench-vmimg-") as tmp:
        base = Path(tmp)
        (base / "vms").mkdir()
        images = RootImages(default_rootfs=args.dir / "rootfs.ext4", default_image=BASE,
                            vms_dir=base / "vms", images_dir=base / "images",
                            prefix="dentest-bench")
        for i in range(args.rounds):
            tag = f"dentest-bench-vmimg-{secrets.token_hex(3)}:1"
            subprocess.run(["docker", "build", "-q", "-t", tag, "-"], check=True,
                           capture_output=True, input=(
                               f"FROM {BASE}\nRUN echo {tag} > /etc/den-marker\n").encode())
            try:
                for side in ("raw", "den") if i % 2 == 0 else ("den", "raw"):  # cache fairness
                    if side == "raw":
                        work = base / f"raw-{i}"
                        work.mkdir()
                        started = time.monotonic()
                        _raw(tag, work)
                        raw.append(time.monotonic() - started)
                        shutil.rmtree(work)
                    else:
                        started = time.monotonic()
                        with images.base(tag) as made:
                            den.append(time.monotonic() - started)
                        made.unlink()
                        _settle(base / "images")
            finally:
                subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)
    load = Path("/proc/loadavg").read_text().split()[0]
    d, r = statistics.median(den), statistics.median(raw)
    print(f"image -> root filesystem (n={args.rounds}, load {load}): raw recipe {r:.1f} s, "
          f"Den {d:.1f} s, ratio {d / r:.2f}x")


if __name__ == "__main__":
    main()
