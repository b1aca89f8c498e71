"""Create → first exec from a prebuild, against the same create without it, in one run.

    .venv/bin/python -m tests.benchmarks.bench_prebuild [--rounds N] [--json out.json]

(docs/benchmarks.md explains the results.)

In this process, on the real engine (engine prefix ``denbench-pb-<random>``, removed at the
end, also after a failure), one repository whose devcontainer.json uses ``image`` and whose
``postCreateCommand`` takes 30 s (``sleep 30``):

1. A prebuild of it (timed once: clone, image, the 30 s command, memory snapshot).
2. ``--rounds`` triples, rotating which goes first: create → running → first exec (``true``)
   through the API (in-process app, the real engine):
   - **ahead**: with the prebuild, once its fork made ahead is frozen and waiting (the wait
     is not counted; the round counts only when the event log says the create took it);
   - **fork**: with the prebuild, forked at the create (the same request with 64 MB more
     memory, which the fork made ahead does not fit): what a create paid before forks were
     made ahead;
   - **without**: ``"prebuild": false`` (the 30 s command runs again).
   Each workspace is deleted after.
3. The raw engine's least work for a workspace from an image, the same rounds:
   ``docker run -d --runtime runsc`` + ``docker exec true`` (SDK), then removed.

Nothing asserts on time.
"""

from __future__ import annotations

import argparse
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
from server.config import Settings
from tests.benchmarks.bench_devcontainer import make_repo
from tests.conftest import remove_engine_objects, users

CONFIG = '{"image": "den/workspace:latest", "postCreateCommand": "sleep 30"}'


def s(samples: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(samples), 3),
            "samples_s": [round(x, 3) for x in samples]}


def bench(settings: Settings, repo: str, rounds: int) -> dict[str, Any]:
    app = create_app(settings)
    with TestClient(app) as client:
        h = {"Authorization": f"Bearer {users(app)['alice']}"}
        t = time.perf_counter()
        r = client.post("/api/v1/prebuilds", headers=h, json={"repo": repo})
        assert r.status_code == 202, r.text
        pid = r.json()["id"]
        while (pb := client.get(f"/api/v1/prebuilds/{pid}", headers=h).json())[
                "state"] == "building":
            time.sleep(0.2)
        prebuild_s = time.perf_counter() - t
        assert pb["state"] == "ready", pb

        def fork_ready() -> float:
            t = time.perf_counter()
            while not client.get(f"/api/v1/prebuilds/{pid}", headers=h).json()["fork_ready"]:
                assert time.perf_counter() - t < 600, "no fork made ahead"
                time.sleep(0.05)
            return time.perf_counter() - t

        def first_exec(name: str, how: str) -> float:
            prebuild = how != "without"
            body: dict[str, Any] = {"name": name, "repo": {"url": repo}, "prebuild": prebuild}
            if how == "fork":
                body["resources"] = {"memory_mb": settings.default_memory_mb + 64}
            t = time.perf_counter()
            r = client.post("/api/v1/workspaces", headers=h, json=body)
            assert r.status_code == 202, r.text
            ws_id = r.json()["id"]
            while (ws := client.get(f"/api/v1/workspaces/{ws_id}", headers=h).json())[
                    "state"] == "creating":
                time.sleep(0.01)
            assert ws["state"] == "running", ws
            r = client.post(f"/api/v1/workspaces/{ws_id}/exec", headers=h, json={"cmd": ["true"]})
            took = time.perf_counter() - t
            assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
            events = client.get(f"/api/v1/workspaces/{ws_id}/events", headers=h).json()["events"]
            used = any("from prebuild" in e["message"] for e in events)
            assert used is prebuild, events
            took_ahead = any("took the fork made ahead" in e["message"] for e in events)
            assert took_ahead is (how == "ahead"), events
            assert client.delete(f"/api/v1/workspaces/{ws_id}", headers=h).status_code == 204
            return took

        took: dict[str, list[float]] = {"ahead": [], "fork": [], "without": []}
        refill: list[float] = []
        kinds = list(took)
        for i in range(rounds):
            for how in kinds[i % 3:] + kinds[:i % 3]:
                if how == "ahead":
                    refill.append(fork_ready())
                took[how].append(first_exec(f"{how}{i}", how))
        assert client.delete(f"/api/v1/prebuilds/{pid}", headers=h).status_code == 204
    ahead = statistics.median(took["ahead"])
    return {"prebuild_made_s": round(prebuild_s, 1), "ahead": s(took["ahead"]),
            "fork_at_create": s(took["fork"]), "without_prebuild": s(took["without"]),
            "fork_ready_wait": s(refill),
            "speedup_vs_without": round(statistics.median(took["without"]) / ahead, 1),
            "speedup_vs_fork": round(statistics.median(took["fork"]) / ahead, 1)}


def raw(prefix: str, rounds: int) -> dict[str, Any]:
    client = docker.from_env()
    took = []
    for i in range(rounds):
        t = time.perf_counter()
        c = client.containers.run("den/workspace:latest", ["sleep", "infinity"], detach=True,
                                  runtime="runsc", name=f"{prefix}-raw{i}", network_mode="none")
        try:
            assert c.exec_run(["true"]).exit_code == 0
            took.append(time.perf_counter() - t)
        finally:
            c.remove(force=True)
    return s(took)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prefix = f"denbench-pb-{secrets.token_hex(2)}"
    root = Path(tempfile.mkdtemp(prefix="den-bench-pb-"))
    (root / "repos").mkdir()
    make_repo(root, "slow", {".devcontainer/devcontainer.json": CONFIG, "README.md": "# x\n"})
    settings = Settings(data_dir=root / "data", local_repo_roots=[root / "repos"],
                        engine_prefix=prefix, default_memory_mb=512, default_cpus=1.0,
                        stop_timeout_s=2, reaper_interval_s=0, ssh_port=0,
                        devcontainer_builds="on",
                        # polled every 10 ms for 30 s and more: no rate limit in the way
                        rate_limit_per_token=0, rate_limit_per_address=0)
    try:
        den = bench(settings, str(root / "repos" / "slow.git"), args.rounds)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        load = Path("/proc/loadavg").read_text().split()[:3]
        result = {"commit": commit, "load": load, "den": den,
                  "raw_docker_run_exec": raw(prefix, args.rounds)}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        remove_engine_objects(prefix)
        subprocess.run(["rm", "-rf", str(root)], capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
