"""Pause and resume (memory checkpoints) through Den against the raw engine, in the same run.

    .venv/bin/python -m tests.benchmarks.bench_pause [--rounds N] [--big-rounds M]
        [--sizes idle,256,1024] [--json out.json] [--no-breakdown] [--alternatives]

(docs/benchmarks.md, "Pause and resume", explains the results.)

Starts a real ``den serve`` on a free loopback port (temporary data dir, its own engine
prefix ``denbench-pause-<random>``, DEN_DEFAULT_MEMORY_MB=2048 so that 1 GiB fits, the idle
reaper off) and drives it over HTTP with httpx, the way an agent does. For each memory size
it makes one Den workspace (``POST /workspaces`` from a small local bare repository) and one
raw runsc container with the same sandbox (``docker run`` flags derived from
``server.runtime.docker_specs.container_config``), and in both starts the same process in
dev's tmux (its server descends from the container's main process, so gVisor restores it):
python holding SIZE MiB of ``os.urandom`` bytes (touched and incompressible). "idle" holds
nothing extra. Then, round by round, raw and Den alternating which goes first:

- raw: ``docker checkpoint create C cp`` (checkpoint), size of the checkpoint on disk,
  ``docker start --checkpoint cp C`` (restore), ``docker exec C true``;
  ``docker checkpoint rm C cp`` (untimed).
- Den: ``POST .../pause``, size of ``den-pause`` on disk (while paused),
  ``POST .../resume``, ``POST .../exec {"cmd": ["true"]}``.

Checkpoint sizes are ``du -sb`` of ``<DockerRootDir>/containers/<id>/checkpoints/<name>``.
After every resume the memory-holding process must still be there (same pid).

Then (unless ``--no-breakdown``) it runs Den's own pause and resume steps
(``DockerRuntime.pause``/``resume`` taken apart, with the server's code and Docker SDK calls)
on the raw container, timing each: where Den's extra time goes. With ``--alternatives`` it
also times, on the raw container, ``runsc checkpoint`` called directly (default flate
compression and ``--compression=none``) with the image written outside Docker, and
``docker start --checkpoint`` of a checkpoint directory holding only symlinks to that image:
what the engine's own checkpoint plumbing costs (see :func:`direct_checkpoints`).

Every container, volume and checkpoint it makes carries its prefix and is removed at the
end, also after a failure, Ctrl-C or SIGTERM; the server is stopped. containerd leaves a copy
of the checkpoint in ``/tmp/ctrd-checkpoint*`` after every restore; the copies of this run's
checkpoints (recognised by content) are removed too. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_workspaces import (
    IMAGE,
    Results,
    Server,
    cleanup_engine,
    ignore_interrupts,
    machine,
    make_repo,
    median,
    ms,
    p90,
    report_failure,
    restore_interrupts,
    sh,
    sigterm_as_interrupt,
    timed,
)
from tests.server_process import DenServer

MEMORY_MB = 2048  # the workspace limit: room for 1 GiB held plus python and the sandbox
CPUS = 2.0
PIDS = 1024
STOP_TIMEOUT_S = 2
CHECKPOINT = "den-pause"  # server.workspaces.service.CHECKPOINT
RAW_CHECKPOINT = "cp"
READY = "/tmp/den-bench-mem"  # the holder writes its pid here once its memory is touched
CHUNK = 1 << 24
E2B_S_PER_GIB = 4.0  # E2B's published pause speed: 4 s per GiB of memory
IDLE_RESUME_GOAL_S = 0.5
RESUME_GOAL_RATIO = 1.2


HOLDER = """\
import os, sys, time
n = int(sys.argv[1])
b = bytearray(n)
for i in range(0, n, CHUNK):
    b[i:i + CHUNK] = os.urandom(min(CHUNK, n - i))
with open(READY + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(READY + ".tmp", READY)
time.sleep(10 ** 6)
"""


def hold_command(size_mb: int) -> str:
    """A shell command (run as dev) that starts, in dev's tmux, a python holding ``size_mb``
    MiB of random (incompressible) bytes, filled in 16 MiB steps so that the peak stays near
    ``size_mb``; it writes its pid to READY when all of it is touched."""
    script = f"CHUNK = {CHUNK}\nREADY = {READY!r}\n" + HOLDER
    return (f"rm -f {READY}; cat > /tmp/den-bench-hold.py <<'EOF'\n{script}EOF\n"
            f"tmux new-session -d -s mem 'exec python3 /tmp/den-bench-hold.py "
            f"{size_mb * 1024 * 1024}'")


def check_holder_command() -> str:
    """Exits 0 when the holder whose pid is in READY is alive; prints its VmRSS (kB)."""
    return (f"p=$(cat {READY}) && kill -0 $p && "
            "awk '/^VmRSS:/ {print $2}' /proc/$p/status")


def parse_size(s: str) -> int:
    s = s.strip().lower()
    if s in ("idle", "0"):
        return 0
    return int(s.removesuffix("m").removesuffix("mb").removesuffix("mib"))


def label(size_mb: int) -> str:
    if size_mb == 0:
        return "idle"
    return f"{size_mb // 1024} GiB" if size_mb % 1024 == 0 else f"{size_mb} MiB"


def timed_sh(*argv: str) -> float:
    return timed(lambda: sh(*argv))


def docker_root() -> Path:
    return Path(sh("docker", "info", "--format", "{{.DockerRootDir}}").strip())


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"du -sb {path} failed: {out.stderr.strip()}")
    return int(out.stdout.split()[0])


def fingerprint(d: Path) -> tuple[tuple[str, str], ...]:
    """What a checkpoint directory holds: each file's name, size and a hash of its first and
    last 64 KiB (a symlink: its target). Equal for a checkpoint and a copy of it."""
    out = []
    for f in sorted(d.iterdir()):
        if f.is_symlink():
            out.append((f.name, "-> " + os.readlink(f)))
            continue
        size = f.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 16))
            if size > 1 << 17:
                fh.seek(-(1 << 16), os.SEEK_END)
                h.update(fh.read(1 << 16))
        out.append((f.name, h.hexdigest()))
    return tuple(out)


class TempCopies:
    """containerd 1.6 (Docker 20.10's) untars the checkpoint into ``/tmp/ctrd-checkpoint*``
    for every restore and never removes it (containerd/containerd#10166): a full copy of the
    memory image per resume. This removes the copies of checkpoints this benchmark made (the
    same files, by :func:`fingerprint`), and only those, and counts them."""

    PATTERN = "/tmp/ctrd-checkpoint*"

    def __init__(self) -> None:
        self.prints: set[tuple[tuple[str, str], ...]] = set()
        self.since = time.time() - 5
        self.removed = 0
        self.removed_bytes = 0

    def remember(self, checkpoint_dir: Path) -> None:
        self.prints.add(fingerprint(checkpoint_dir))

    def sweep(self) -> int:
        """Remove the copies found now; their total size in bytes."""
        total = 0
        for name in glob.glob(self.PATTERN):
            d = Path(name)
            try:
                if d.stat().st_mtime < self.since or fingerprint(d) not in self.prints:
                    continue
                size = du_bytes(d)
            except (OSError, RuntimeError):
                continue
            shutil.rmtree(d, ignore_errors=True)
            total += size
            self.removed += 1
        self.removed_bytes += total
        return total


# --- the server under test ---------------------------------------------------------------------


class PauseServer(Server):
    """``den serve`` with workspaces big enough for 1 GiB, and the idle reaper off."""

    def __init__(self, work: Path, repos_root: Path, prefix: str) -> None:
        DenServer.__init__(self, work / "data", repos_root, prefix, user="bench",
                           http_timeout_s=300, own_session=True,
                           default_memory_mb=MEMORY_MB, default_cpus=CPUS, default_pids=PIDS,
                           stop_timeout_s=STOP_TIMEOUT_S, reaper_interval_s=0)

    def exec_cmd(self, wid: str, cmd: str, timeout_s: float = 60) -> dict[str, Any]:
        return self._ok(self.http.post(f"/api/v1/workspaces/{wid}/exec",
                                       json={"cmd": cmd, "timeout_s": timeout_s}), 200)

    def state_op(self, wid: str, op: str, want: str) -> None:
        ws = self._ok(self.http.post(f"/api/v1/workspaces/{wid}/{op}"), 200)
        if ws["state"] != want:
            raise RuntimeError(f"{op} of {wid}: state {ws['state']} ({ws.get('state_reason')})")


# --- the raw engine ------------------------------------------------------------------------


def raw_run_flags(volume: str) -> list[str]:
    """``docker run`` flags for the sandbox Den creates for a workspace of MEMORY_MB, CPUS and
    PIDS, from the server's own spec builder (shared with bench_workspaces)."""
    from tests.benchmarks.bench_workspaces import raw_run_flags as flags_for

    return flags_for(volume, image=IMAGE, cpus=CPUS, memory_mb=MEMORY_MB, pids=PIDS)


def dev_exec_flags() -> list[str]:
    """``docker exec`` flags for running as dev with the environment Den's exec gives."""
    from server.runtime import docker_specs

    flags = ["-u", "dev", "-w", "/workspace"]
    for k, v in docker_specs.exec_env("dev", {}, {}).items():
        flags += ["-e", f"{k}={v}"]
    return flags


class RawContainer:
    def __init__(self, prefix: str, name: str) -> None:
        from server.runtime import docker_specs

        self.name = name
        sh("docker", "run", "-d", "--name", name, *raw_run_flags(f"{name}-data"),
           "--label", f"denbench={prefix}", IMAGE, *docker_specs.INIT_COMMAND)
        self.id = sh("docker", "inspect", "--format", "{{.Id}}", name).strip()

    def dev(self, cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "exec", *dev_exec_flags(), self.name, "bash", "-c", cmd],
                              capture_output=True, text=True)


# --- the measurements --------------------------------------------------------------------------


def wait_ready(run: Callable[[str], tuple[int, str]], what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        code, out = run(f"test -s {READY} && cat {READY}")
        if code == 0 and out.strip():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: the memory holder was not ready in {timeout_s:g} s")
        time.sleep(0.5)


def holder_rss_kb(run: Callable[[str], tuple[int, str]], what: str) -> int:
    code, out = run(check_holder_command())
    if code != 0 or not out.strip():
        raise RuntimeError(f"{what}: the memory holder is gone ({code}: {out.strip()})")
    return int(out.split()[-1])


_SECONDS = re.compile(r"in ([0-9.]+) s")


def server_seconds(events: list[dict[str, Any]], to_state: str) -> float | None:
    """The seconds the server measured around its engine call, from the last transition to
    ``to_state`` ("memory saved in 1.23 s", "restored from memory in 0.45 s")."""
    for e in reversed(events):
        if e.get("to_state") == to_state:
            m = _SECONDS.search(e.get("message") or "")
            return float(m.group(1)) if m else None
    return None


def bench_size(srv: PauseServer, prefix: str, repo: Path, root: Path, size_mb: int,
               rounds: int, res: Results, copies: TempCopies, *, breakdown: bool,
               alternatives: Path | None) -> dict[str, Any]:
    tag = label(size_mb)
    info: dict[str, Any] = {"size_mb": size_mb, "rounds": rounds}

    # The Den workspace and the raw container, each holding the memory.
    wid = srv.create(f"pause-{size_mb}", repo)
    srv.wait_running(wid, poll_s=0.1, timeout_s=180)
    den_name = f"{prefix}-{wid}"
    den_id = sh("docker", "inspect", "--format", "{{.Id}}", den_name).strip()
    raw = RawContainer(prefix, f"{prefix}-raw-{size_mb}")

    def den_run(cmd: str) -> tuple[int, str]:
        out = srv.exec_cmd(wid, cmd)
        return int(out["exit_code"]), str(out["stdout"]) + str(out["stderr"])

    def raw_run(cmd: str) -> tuple[int, str]:
        p = raw.dev(cmd)
        return p.returncode, p.stdout + p.stderr

    sh("docker", "exec", raw.name, "true")  # booted before the memory is filled
    srv.exec_true(wid)
    if size_mb:
        t0 = time.perf_counter()
        for run, what in ((den_run, "den"), (raw_run, "raw")):
            code, out = run(hold_command(size_mb))
            if code != 0:
                raise RuntimeError(f"{what}: starting the memory holder failed: {out}")
        wait_ready(den_run, "den")
        wait_ready(raw_run, "raw")
        info["fill_s"] = time.perf_counter() - t0
        info["rss_kb"] = {"den": holder_rss_kb(den_run, "den"),
                          "raw": holder_rss_kb(raw_run, "raw")}
        pids = {"den": den_run(f"cat {READY}")[1].strip(),
                "raw": raw_run(f"cat {READY}")[1].strip()}
    time.sleep(1)  # let the fill's page cache / allocator settle on both sides

    def verify(run: Callable[[str], tuple[int, str]], what: str) -> None:
        if not size_mb:
            return
        rss = holder_rss_kb(run, what)
        pid = run(f"cat {READY}")[1].strip()
        if pid != pids[what]:
            raise RuntimeError(f"{what}: the memory holder restarted ({pids[what]} -> {pid})")
        res.add(f"{tag}: {what} holder RSS after restore, MiB (count)", rss / 1024)

    raw_cp = root / "containers" / raw.id / "checkpoints" / RAW_CHECKPOINT
    den_cp = root / "containers" / den_id / "checkpoints" / CHECKPOINT

    def raw_cycle() -> None:
        res.add(f"{tag}: raw checkpoint",
                timed(lambda: sh("docker", "checkpoint", "create", raw.name, RAW_CHECKPOINT)))
        res.add(f"{tag}: raw checkpoint MB (count)", du_bytes(raw_cp) / 1e6)
        copies.remember(raw_cp)
        restore = timed(lambda: sh("docker", "start", "--checkpoint", RAW_CHECKPOINT, raw.name))
        first = timed(lambda: sh("docker", "exec", raw.name, "true"))
        res.add(f"{tag}: raw restore", restore)
        res.add(f"{tag}: raw first exec", first)
        res.add(f"{tag}: raw restore + exec", restore + first)
        res.add(f"{tag}: /tmp/ctrd-checkpoint copy left per restore, MB (count)",
                copies.sweep() / 1e6)
        verify(raw_run, "raw")
        sh("docker", "checkpoint", "rm", raw.name, RAW_CHECKPOINT)

    def den_cycle() -> None:
        res.add(f"{tag}: den pause", timed(lambda: srv.state_op(wid, "pause", "paused")))
        if not den_cp.is_dir():
            raise RuntimeError(f"den: no checkpoint at {den_cp} while paused")
        res.add(f"{tag}: den checkpoint MB (count)", du_bytes(den_cp) / 1e6)
        copies.remember(den_cp)
        resume = timed(lambda: srv.state_op(wid, "resume", "running"))
        first = timed(lambda: srv.exec_true(wid))
        res.add(f"{tag}: den resume", resume)
        res.add(f"{tag}: den first exec", first)
        res.add(f"{tag}: den resume + exec", resume + first)
        res.add(f"{tag}: /tmp/ctrd-checkpoint copy left per restore, MB (count)",
                copies.sweep() / 1e6)
        ev = srv.events(wid)
        for to_state, key in (("paused", "den pause, server-side"),
                              ("running", "den resume, server-side (before delete)")):
            s = server_seconds(ev, to_state)
            if s is not None:
                res.add(f"{tag}: {key}", s)
        if not any("restored from memory in" in (e.get("message") or "") for e in ev[-3:]):
            raise RuntimeError(f"den: resume did not restore from memory: {ev[-3:]}")
        verify(den_run, "den")

    for i in range(rounds):
        first, second = (raw_cycle, den_cycle) if i % 2 == 0 else (den_cycle, raw_cycle)
        first()
        second()
        print(f"  {tag} round {i + 1}/{rounds}: "
              f"checkpoint raw {ms(res.samples[f'{tag}: raw checkpoint'][-1])}, "
              f"den pause {ms(res.samples[f'{tag}: den pause'][-1])}; "
              f"restore+exec raw {ms(res.samples[f'{tag}: raw restore + exec'][-1])}, "
              f"den resume+exec {ms(res.samples[f'{tag}: den resume + exec'][-1])}", flush=True)

    if breakdown:
        steps_breakdown(raw, root, tag, res, copies)
        verify(raw_run, "raw")
    if alternatives is not None:
        direct_checkpoints(raw, root, tag, res, copies, alternatives)
        verify(raw_run, "raw")
    srv.delete(wid)
    subprocess.run(["docker", "rm", "-f", raw.name], capture_output=True)
    subprocess.run(["docker", "volume", "rm", "-f", f"{raw.name}-data"], capture_output=True)
    return info


# Den's quiesce, reading /proc/*/stat with the shell's own `read` instead of one
# `$(cat ...)` (a fork and an exec) per process: what that cost is.
def quiesce_no_cat() -> str:
    from server.runtime.docker_specs import QUIESCE_SCRIPT

    per_process_cat = 's=$(cat "$d/stat" 2>/dev/null) || continue'
    assert per_process_cat in QUIESCE_SCRIPT, "Den's quiesce changed; update this variant"
    return QUIESCE_SCRIPT.replace(per_process_cat, 'read -r s 2>/dev/null < "$d/stat" || continue')


def steps_breakdown(raw: RawContainer, root: Path, tag: str, res: Results, copies: TempCopies,
                    samples: int = 5) -> None:
    """``DockerRuntime.pause`` and ``resume`` (and the service's delete of the checkpoint
    after a resume) taken apart, run on the raw container with the server's own code."""
    from server.runtime import docker, docker_specs
    from server.runtime.base import ExecRequest, WorkspaceSpec

    rt = docker.DockerRuntime(gvisor_runtime="runsc")
    api = rt._api()
    spec = WorkspaceSpec(workspace_id="raw", container_name=raw.name,
                         volume_name=f"{raw.name}-data", image=IMAGE, runtime="gvisor",
                         cpus=CPUS, memory_mb=MEMORY_MB, pids_limit=PIDS, hostname="raw",
                         labels={})
    quiesce = ExecRequest(argv=docker_specs.quiesce_argv(), user="root", cwd="/")
    no_cat = ExecRequest(argv=["/bin/sh", "-c", quiesce_no_cat()], user="root", cwd="/")
    noop = ExecRequest(argv=["true"], user="root", cwd="/")
    nprocs = raw.dev("ls -d /proc/[0-9]* | wc -l").stdout.strip()
    res.add(f"{tag}: steps: processes in the sandbox (count)", float(nprocs or "nan"))
    loop = asyncio.new_event_loop()
    try:
        for _ in range(samples):  # the quiesce alone, on the running sandbox
            res.add(f"{tag}: steps: quiesce exec (Den's script)",
                    timed(lambda: rt._exec_blocking(spec, quiesce)))
            res.add(f"{tag}: steps: quiesce exec, `read` instead of `cat` (alternative)",
                    timed(lambda: rt._exec_blocking(spec, no_cat)))
            res.add(f"{tag}: steps: helper exec of `true` (floor)",
                    timed(lambda: rt._exec_blocking(spec, noop)))
        # One pause and resume, step by step, as DockerRuntime and the service do them.
        t_all = time.perf_counter()
        res.add(f"{tag}: steps: pause: inspect",
                timed(lambda: api.inspect_container(raw.name)))
        res.add(f"{tag}: steps: pause: delete old checkpoint (none)",
                timed(lambda: docker._delete_checkpoint(api, raw.name, CHECKPOINT)))
        res.add(f"{tag}: steps: pause: quiesce exec",
                timed(lambda: rt._exec_blocking(spec, quiesce)))
        # After the quiesce DockerRuntime.pause lets the sandbox reap the exec'd processes:
        # a fixed sleep (QUIESCE_SETTLE_S) or, in newer code, a wait on runsc's process list.
        wait_for_execs = getattr(rt, "_wait_for_exec_processes", None)
        if callable(wait_for_execs):
            res.add(f"{tag}: steps: pause: wait for exec'd processes (runsc ps)",
                    timed(lambda: wait_for_execs(raw.id)))
        else:
            settle = float(getattr(docker, "QUIESCE_SETTLE_S", 0.0))
            res.add(f"{tag}: steps: pause: settle (QUIESCE_SETTLE_S)",
                    timed(lambda: time.sleep(settle)))

        def checkpoint() -> None:
            r = api._post_json(api._url("/containers/{0}/checkpoints", raw.name),
                               data={"CheckpointID": CHECKPOINT, "Exit": True})
            api._raise_for_status(r)

        res.add(f"{tag}: steps: pause: checkpoint (Engine API)", timed(checkpoint))
        res.add(f"{tag}: steps: pause: total", time.perf_counter() - t_all)
        copies.remember(root / "containers" / raw.id / "checkpoints" / CHECKPOINT)
        t_all = time.perf_counter()
        res.add(f"{tag}: steps: resume: DockerRuntime.resume (inspect + start)",
                timed(lambda: loop.run_until_complete(rt.resume(spec, checkpoint=CHECKPOINT))))
        res.add(f"{tag}: steps: resume: delete checkpoint after restore",
                timed(lambda: docker._delete_checkpoint(api, raw.name, CHECKPOINT)))
        res.add(f"{tag}: steps: resume: total", time.perf_counter() - t_all)
        first = ExecRequest(argv=["true"], cwd="/workspace", timeout_s=600)
        res.add(f"{tag}: steps: first exec after restore (DockerRuntime.exec)",
                timed(lambda: loop.run_until_complete(rt.exec(spec, first))))
        copies.sweep()
    finally:
        loop.close()
        rt.close()


RUNSC_STATE_ROOT = "/run/docker/runtime-runc/moby"  # where Docker 20.10's runc shim keeps state


def runsc_argv() -> list[str]:
    """The runsc Docker runs (the registered runtime's path and runtimeArgs), on the state
    directory Docker's shim gives it."""
    runtimes = json.loads(sh("docker", "info", "--format", "{{json .Runtimes}}"))
    rt = runtimes.get("runsc") or {}
    return [rt.get("path") or "runsc", *(rt.get("runtimeArgs") or []), "--root",
            RUNSC_STATE_ROOT]


def direct_checkpoints(raw: RawContainer, root: Path, tag: str, res: Results,
                       copies: TempCopies, images: Path) -> None:
    """What Docker's checkpoint plumbing costs, and what an uncompressed image saves:
    ``runsc checkpoint`` called directly on the Docker-run sandbox with each compression,
    the image written outside Docker (``images``), then ``docker start --checkpoint`` of a
    checkpoint directory that holds only symlinks to that image. Docker and containerd then
    copy (tar, hash, untar) a few bytes instead of the whole image; runsc follows the links."""
    runsc = runsc_argv()
    if subprocess.run([*runsc, "state", raw.id], capture_output=True).returncode:
        print(f"  {tag}: alternatives skipped: runsc state of {raw.name} not in "
              f"{RUNSC_STATE_ROOT}", file=sys.stderr)
        return
    slug = tag.replace(" ", "")
    for mode in ("flate-best-speed", "none"):
        image = images / f"{slug}-{mode}"
        shutil.rmtree(image, ignore_errors=True)
        key = f"{tag}: alt: compression={mode}:"
        res.add(f"{key} runsc checkpoint (direct)", timed_sh(
            *runsc, "checkpoint", f"--compression={mode}", "--image-path", str(image), raw.id))
        t0 = time.perf_counter()
        while sh("docker", "inspect", "-f", "{{.State.Running}}", raw.name).strip() != "false":
            if time.perf_counter() - t0 > 60:
                raise RuntimeError(f"{raw.name}: Docker did not see the checkpointed sandbox exit")
            time.sleep(0.02)
        res.add(f"{key} until Docker saw the exit", time.perf_counter() - t0)
        res.add(f"{key} image MB (count)", du_bytes(image) / 1e6)
        name = f"den-alt-{mode}"
        links = root / "containers" / raw.id / "checkpoints" / name
        links.mkdir(parents=True)
        for f in image.iterdir():
            (links / f.name).symlink_to(f)
        copies.remember(links)
        res.add(f"{key} docker start --checkpoint (symlinked image)",
                timed_sh("docker", "start", "--checkpoint", name, raw.name))
        res.add(f"{key} first exec", timed_sh("docker", "exec", raw.name, "true"))
        sh("docker", "checkpoint", "rm", raw.name, name)
        shutil.rmtree(image, ignore_errors=True)
        copies.sweep()


# --- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    size_mb: int
    raw_cp: list[float]
    den_pause: list[float]
    raw_resume: list[float]
    den_resume: list[float]
    raw_mb: list[float]
    den_mb: list[float]


def lines(res: Results, sizes: list[int]) -> list[Line]:
    out = []
    for size in sizes:
        t = label(size)
        s = res.samples
        if not s.get(f"{t}: den pause") or not s.get(f"{t}: raw checkpoint"):
            continue
        out.append(Line(size, s[f"{t}: raw checkpoint"], s[f"{t}: den pause"],
                        s[f"{t}: raw restore + exec"], s[f"{t}: den resume + exec"],
                        s.get(f"{t}: raw checkpoint MB (count)", []),
                        s.get(f"{t}: den checkpoint MB (count)", [])))
    return out


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def table(res: Results, sizes: list[int]) -> tuple[str, list[dict[str, Any]]]:
    header = ["size", "raw checkpoint", "Den pause", "ratio", "raw restore+exec",
              "Den resume→first exec", "ratio", "checkpoint MB raw / Den"]
    text_rows, rows = [], []
    for ln in lines(res, sizes):
        rc, dp = median(ln.raw_cp), median(ln.den_pause)
        rr, dr = median(ln.raw_resume), median(ln.den_resume)
        rows.append({"size_mb": ln.size_mb, "n": min(len(ln.den_pause), len(ln.raw_cp)),
                     "raw_checkpoint_s": rc, "den_pause_s": dp, "pause_ratio": dp / rc,
                     "raw_restore_exec_s": rr, "den_resume_exec_s": dr,
                     "resume_ratio": dr / rr, "raw_checkpoint_mb": median(ln.raw_mb),
                     "den_checkpoint_mb": median(ln.den_mb)})
        text_rows.append([label(ln.size_mb), f"{ms(rc)} ({ms(p90(ln.raw_cp))})",
                          f"{ms(dp)} ({ms(p90(ln.den_pause))})", f"{dp / rc:.2f}x",
                          f"{ms(rr)} ({ms(p90(ln.raw_resume))})",
                          f"{ms(dr)} ({ms(p90(ln.den_resume))})", f"{dr / rr:.2f}x",
                          f"{median(ln.raw_mb):.0f} / {median(ln.den_mb):.0f}"])
    return fmt_table(header, text_rows), rows


def goals(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    out, found = [], []

    def add(goal: str, value: str, met: bool) -> None:
        found.append({"goal": goal, "value": value, "met": met})
        out.append(f"- {goal}: {value} -> {'met' if met else 'NOT met'}")

    for r in rows:
        t = label(r["size_mb"])
        add(f"{t}: resume->first exec <= {RESUME_GOAL_RATIO}x raw restore + raw exec",
            f"{r['resume_ratio']:.2f}x", r["resume_ratio"] <= RESUME_GOAL_RATIO)
        if r["size_mb"] == 0:
            add(f"idle: resume->first exec < {IDLE_RESUME_GOAL_S} s",
                f"{r['den_resume_exec_s']:.2f} s", r["den_resume_exec_s"] < IDLE_RESUME_GOAL_S)
        if r["size_mb"] >= 1024:
            gib = r["size_mb"] / 1024
            den, rawv = r["den_pause_s"] / gib, r["raw_checkpoint_s"] / gib
            add(f"{t}: pause at least as fast as E2B's {E2B_S_PER_GIB:g} s/GiB",
                f"Den {den:.1f} s/GiB (raw runsc {rawv:.1f} s/GiB)", den <= E2B_S_PER_GIB)
    return "\n".join(out), found


def details(res: Results, title: str) -> str:
    out = [title]
    width = max((len(k) for k in res.samples), default=0)
    for k, v in res.samples.items():
        if k.endswith("(count)"):
            out.append(f"  {k:<{width}}  median {median(v):8.1f}     max {max(v):8.1f}  "
                       f"n={len(v)}")
        else:
            out.append(f"  {k:<{width}}  median {ms(median(v)):>8}  p90 {ms(p90(v)):>8}  "
                       f"n={len(v)}")
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------------


def pause_code() -> str:
    """Which quiesce this run measured (the server code changes): its script's hash and what
    DockerRuntime.pause waits on after it."""
    from server.runtime import docker, docker_specs

    digest = hashlib.sha256(docker_specs.QUIESCE_SCRIPT.encode()).hexdigest()[:10]
    if hasattr(docker.DockerRuntime, "_wait_for_exec_processes"):
        wait = "then waits on runsc ps"
    else:
        wait = f"then sleeps {getattr(docker, 'QUIESCE_SETTLE_S', 0)} s"
    return f"quiesce script sha256 {digest}, {wait}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_pause",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3,
                    help="pause/resume rounds per size below 1 GiB (3)")
    ap.add_argument("--big-rounds", type=int, default=2,
                    help="rounds for sizes of 1 GiB and more (2; 20-40 s each way per round)")
    ap.add_argument("--sizes", default="idle,256,1024",
                    help="memory held in the workspace, MiB, comma-separated; 'idle' holds "
                         "nothing extra (idle,256,1024)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip timing Den's pause/resume steps on the raw container")
    ap.add_argument("--alternatives", action="store_true",
                    help="also time runsc's own checkpoint (flate and uncompressed) called "
                         "directly, and Docker's restore of a symlinked image")
    args = ap.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: expected 'idle' or MiB, got {args.sizes!r}")
    if any(s < 0 or s > MEMORY_MB - 512 for s in sizes):
        ap.error(f"--sizes: each must be between 0 and {MEMORY_MB - 512} MiB")

    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        print(f"bench: image {IMAGE} is missing (run `make images`)", file=sys.stderr)
        return 2
    prefix = f"denbench-pause-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    repos_root = work / "repos"
    repos_root.mkdir()
    started = datetime.now(UTC)
    load_before = round(os.getloadavg()[0], 2)
    res = Results()
    copies = TempCopies()
    infos: list[dict[str, Any]] = []
    srv: PauseServer | None = None
    failed = 0
    print(f"bench: prefix {prefix}, sizes {', '.join(label(s) for s in sizes)}, "
          f"{args.rounds} rounds ({args.big_rounds} at 1 GiB and more)", flush=True)
    try:
        with sigterm_as_interrupt():
            root = docker_root()
            repo = make_repo(repos_root, work)
            srv = PauseServer(work, repos_root, prefix)
            srv.start()
            for size in sizes:
                rounds = max(1, args.big_rounds if size >= 1024 else args.rounds)
                print(f"bench: {label(size)}", flush=True)
                infos.append(bench_size(
                    srv, prefix, repo, root, size, rounds, res, copies,
                    breakdown=not args.no_breakdown,
                    alternatives=work / "images" if args.alternatives else None))
    except BaseException as exc:
        failed = report_failure(exc, srv)
    finally:
        ignore_interrupts()  # let cleanup finish
        if srv is not None:
            srv.close()
        left = cleanup_engine(prefix)
        with contextlib.suppress(Exception):
            copies.sweep()
        shutil.rmtree(work, ignore_errors=True)
        restore_interrupts()
        if left:
            print(f"bench: removed {len(left)} engine objects named {prefix}*", flush=True)
        if copies.removed:
            print(f"bench: removed {copies.removed} copies of its checkpoints that containerd "
                  f"left in /tmp ({copies.removed_bytes / 1e6:.0f} MB)", flush=True)
    if failed:
        return failed

    text, rows = table(res, sizes)
    goal_text, goal_rows = goals(rows)
    info = machine()
    info["loadavg_1m_before"] = load_before
    info["pause_code"] = pause_code()
    print()
    print(f"Pause/resume, Den vs raw engine, {started:%Y-%m-%d %H:%M} UTC, {info['cpus']} CPUs, "
          f"{info['os']}, Docker {info['docker']}, {info['runsc']}, load {load_before} -> "
          f"{info['loadavg_1m']}, code {info['git']}")
    print(f"runtimes: {info['runtimes']}")
    print(f"DockerRuntime.pause: {info['pause_code']}")
    print(text)
    print("(medians, p90 in brackets; restore+exec = `docker start --checkpoint` + "
          "`docker exec true`; Den = POST resume + POST exec true)")
    print()
    print("Goals:")
    print(goal_text)
    print()
    print(details(res, "Details (medians and p90 per sample):"))
    for i in infos:
        if "fill_s" in i:
            print(f"  {label(i['size_mb'])}: filled both in {i['fill_s']:.1f} s; holder RSS "
                  f"den {i['rss_kb']['den'] / 1024:.0f} MiB, raw {i['rss_kb']['raw'] / 1024:.0f}"
                  " MiB")
    if args.json:
        args.json.write_text(json.dumps({
            "started_at": started.isoformat(), "machine": info, "sizes_mb": sizes,
            "rounds": args.rounds, "big_rounds": args.big_rounds, "table": rows,
            "goals": goal_rows, "sizes": infos,
            "tmp_copies_removed": {"count": copies.removed, "bytes": copies.removed_bytes},
            "details": res.summary(),
            "samples": res.samples,
        }, indent=2))
        print(f"\nbench: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
