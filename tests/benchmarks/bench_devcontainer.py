"""What a devcontainer image cache hit adds to a create, in one run.

    .venv/bin/python -m tests.benchmarks.bench_devcontainer [--rounds N] [--json out.json]

(docs/benchmarks.md explains the results.)

In this process, on the real engine (engine prefix ``denbench-devc-<random>``, removed at the
end, also after a failure):

1. ``prepare``: what the create path runs for a repository with a devcontainer.json whose image
   is built already (find and parse the file, hash the build context, inspect the FROM image
   and the cached image), for a repository using ``image`` and one using ``build.dockerfile``
   (7 files of context), against the raw engine's least work for the same answer: one
   ``docker image inspect`` of the image through the SDK. Interleaved, ``--rounds`` x 10
   samples each.
2. create → running through the API (in-process app, real engine), the same small repository
   with and without a cached devcontainer.json (``image``), alternating, ``--rounds`` each:
   the difference of the medians is what the devcontainer adds to a create.

Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
from fastapi.testclient import TestClient

from server.app import create_app
from server.backends import docker_devcontainers as devcontainers
from server.config import Settings
from server.devcontainer.setup import Resources
from tests.conftest import git, remove_engine_objects, users

IMAGE_CONFIG = '{"image": "den/workspace:latest", "forwardPorts": [3000]}'
BUILD_CONFIG = '{"build": {"dockerfile": "Dockerfile", "context": ".."}}'
DOCKERFILE = "FROM den/base:bookworm\nCOPY src /src\n"


def make_repo(root: Path, name: str, files: dict[str, str]) -> Path:
    src = root / f"src-{name}"
    src.mkdir()
    git("init", "-q", "-b", "main", cwd=src)
    for rel, content in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(content)
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "initial", cwd=src)
    bare = root / "repos" / f"{name}.git"
    git("clone", "-q", "--bare", str(src), str(bare))
    return src


def ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1000, 1),
            "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1] * 1000, 1), "n": len(ordered)}


async def bench_prepare(settings: Settings, clones: dict[str, Path], rounds: int,
                        work: Path) -> dict[str, Any]:
    devc = devcontainers(settings)
    api = docker.from_env().api
    res = Resources(cpus=1, memory_mb=512, disk_gb=10, gpus=0)
    out: dict[str, Any] = {}
    for kind, clone in clones.items():
        def noop(_kind: str, _msg: str) -> None:
            return None

        first = await devc.prepare(clone, repo_path="/workspace/x", resources=res,
                                   user_env={}, work=work, note=noop)  # builds (miss)
        assert first is not None
        den, raw = [], []
        for _ in range(rounds * 10):
            t = time.perf_counter()
            plan = await devc.prepare(clone, repo_path="/workspace/x", resources=res,
                                      user_env={}, work=work, note=noop)
            den.append(time.perf_counter() - t)
            assert plan is not None and plan.image == first.image
            t = time.perf_counter()
            api.inspect_image(first.image)
            raw.append(time.perf_counter() - t)
        out[kind] = {"den_prepare": ms(den), "raw_inspect": ms(raw),
                     "ratio": round(statistics.median(den) / statistics.median(raw), 2)}
    return out


def bench_create(settings: Settings, repos: Path, rounds: int) -> dict[str, Any]:
    app = create_app(settings)
    plain: list[float] = []
    devc: list[float] = []
    with TestClient(app) as client:
        h = {"Authorization": f"Bearer {users(app)['alice']}"}

        def create(name: str, repo: str) -> float:
            t = time.perf_counter()
            r = client.post("/api/v1/workspaces", headers=h,
                            json={"name": name, "repo": {"url": str(repos / repo)}})
            assert r.status_code == 202, r.text
            ws_id = r.json()["id"]
            while (ws := client.get(f"/api/v1/workspaces/{ws_id}", headers=h).json())[
                    "state"] == "creating":
                time.sleep(0.01)
            took = time.perf_counter() - t
            assert ws["state"] == "running", ws
            assert client.delete(f"/api/v1/workspaces/{ws_id}", headers=h).status_code == 204
            return took

        create("warm-plain", "plain.git")
        create("warm-devc", "withimage.git")  # builds the image once: not counted
        for i in range(rounds):
            pair = [("plain", "plain.git"), ("devc", "withimage.git")]
            for label, repo in (pair if i % 2 == 0 else pair[::-1]):
                (plain if label == "plain" else devc).append(create(f"{label}{i}", repo))
    return {"plain": ms(plain), "devcontainer_cached": ms(devc),
            "added_ms": round((statistics.median(devc) - statistics.median(plain)) * 1000, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prefix = f"denbench-devc-{secrets.token_hex(2)}"
    root = Path(tempfile.mkdtemp(prefix="den-bench-devc-"))
    (root / "repos").mkdir()
    small = {f"src/f{i}.txt": f"file {i}\n" for i in range(5)} | {"README.md": "# x\n"}
    make_repo(root, "plain", small)
    with_image = make_repo(root, "withimage",
                           small | {".devcontainer/devcontainer.json": IMAGE_CONFIG})
    with_build = make_repo(root, "withbuild", small | {
        ".devcontainer/devcontainer.json": BUILD_CONFIG, ".devcontainer/Dockerfile": DOCKERFILE})
    settings = Settings(data_dir=root / "data", local_repo_roots=[root / "repos"],
                        engine_prefix=prefix, default_memory_mb=512, default_cpus=1.0,
                        stop_timeout_s=2, reaper_interval_s=0, ssh_port=0)
    try:
        prepare = asyncio.run(bench_prepare(settings, {"image": with_image, "build": with_build},
                                            args.rounds, root))
        create = bench_create(settings, root / "repos", args.rounds)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        result = {"commit": commit, "prepare": prepare, "create": create}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        remove_engine_objects(prefix)
        subprocess.run(["rm", "-rf", str(root)], capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
