"""Pause and resume (memory checkpoints) through Den against the raw engine, in the same run.

    .venv/bin/python -m tests.benchmarks.bench_pause [--rounds N] [--big-rounds M]
        [--later-cycles K] [--sizes idle,256,1024] [--json out.json] [--no-breakdown]
        [--alternatives]

(docs/benchmarks.md, "Pause and resume", explains the results.)

Starts a real ``den serve`` on a free loopback port (temporary data dir, its own engine
prefix ``denbench-pause-<random>``, DEN_DEFAULT_MEMORY_MB=2048 so that 1 GiB fits, the idle
reaper off) and drives it over HTTP with httpx, the way an agent does. For each memory size
it makes one Den workspace (``POST /workspaces`` from a small local bare repository) and one
raw runsc container with the same sandbox (``docker run`` flags derived from
``server.runtime.docker_specs.container_config``), and in both starts the same process in
dev's tmux (its server descends from the container's main process, so gVisor restores it):
python holding SIZE MiB of ``os.urandom`` bytes (touched and incompressible). "idle" holds
nothing extra. Then, round by round, raw and Den alternating which goes first, each side
pausing only when it has had no exec for a little more than Den's SETTLE_AFTER_EXEC_S (the
common case, a workspace paused when idle; the step that runs otherwise is timed in the
breakdown):

- raw: ``docker checkpoint create C cp`` and until the engine reports C exited
  (checkpoint), size of the checkpoint on disk,
  ``docker start --checkpoint cp C`` (restore), ``docker exec C true``;
  ``docker checkpoint rm C cp`` (untimed).
- Den: ``POST .../pause``, size of its image on disk (while paused),
  ``POST .../resume``, ``POST .../exec {"cmd": ["true"]}``.

Den checkpoints with ``runsc checkpoint --compression=none`` itself, writes the image into
``<DockerRootDir>/containers/<id>/den-checkpoints/den-pause`` and fills the engine's
``checkpoints/den-pause`` with symlinks to it, so its size is ``du -sb`` of the image
directory (the engine's directory must hold only links); the raw engine's is ``du -sb`` of
``checkpoints/cp``. Both record the size of ``checkpoint.img`` (the saved kernel state), which
must stay flat across Den's cycles. After every resume the memory-holding process must still
be there, with the same pid: checked from the host (``runsc ps``), so that the check reads
nothing in the sandbox. Then (``--later-cycles``, 5) Den alone pauses and resumes a few more
times: do later resumes get slower, does the kernel state grow?

Then (unless ``--no-breakdown``) it runs Den's pause step by step on the raw container with
the server's own code (``DockerRuntime`` methods, the same runsc command and flags): inspect,
delete the previous checkpoint and image, ``runsc ps`` for exec'd processes, the settle exec
(which ``DockerRuntime.pause`` runs only within SETTLE_AFTER_EXEC_S of an exec, so it is timed
in every other cycle, right after an exec), ``runsc checkpoint``, waiting until Docker sees
the sandbox exit, linking; then ``DockerRuntime.resume`` and the first exec. With
``--alternatives`` it also times, on the raw container, checkpoints Den could write instead:
runsc's default flate compression, ``--direct`` (O_DIRECT) and
``--exclude-committed-zero-pages``, each restored through the same symlinked directory (see
:func:`alternatives`).

Every container, volume and checkpoint it makes carries its prefix and is removed at the
end, also after a failure, Ctrl-C or SIGTERM; the server is stopped. containerd leaves a copy
of the checkpoint directory in ``/tmp/ctrd-checkpoint*`` after every restore (of Den's: a
directory of symlinks); the copies of this run's checkpoints (recognised by content) are
removed too. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_workspaces import (
    IMAGE,
    Results,
    Server,
    finish_run,
    machine,
    make_repo,
    median,
    ms,
    p90,
    report_failure,
    sh,
    sigterm_as_interrupt,
    start_run,
    timed,
)
from tests.server_process import DenServer

MEMORY_MB = 2048  # the workspace limit: room for 1 GiB held plus python and the sandbox
CPUS = 2.0
PIDS = 1024
STOP_TIMEOUT_S = 2
CHECKPOINT = "den-pause"  # server.workspaces.service.CHECKPOINT
IMAGES_DIR = "den-checkpoints"  # server.runtime.docker.IMAGES_DIR
KERNEL_STATE = "checkpoint.img"  # the part of a runsc image that is not memory pages
RAW_CHECKPOINT = "cp"
READY = "/tmp/den-bench-mem"  # the holder writes its pid here once its memory is touched
CHUNK = 1 << 24
E2B_S_PER_GIB = 4.0  # E2B's published pause speed: 4 s per GiB of memory
IDLE_RESUME_GOAL_S = 0.5
RESUME_GOAL_RATIO = 1.2
QUIET_MARGIN_S = 0.5  # beyond SETTLE_AFTER_EXEC_S, before a pause in the timed rounds


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
    """Bytes under ``path`` as ``du -sb`` counts them (a symlink: the link, not its target)."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"du -sb {path} failed: {out.stderr.strip()}")
    return int(out.stdout.split()[0])


def kernel_state_mb(image: Path) -> float | None:
    """The size of an uncompressed image's checkpoint.img: the saved kernel state, the memory
    pages being in pages.img. (A compressed image keeps everything in checkpoint.img.)"""
    f = image / KERNEL_STATE
    if not (image / "pages.img").exists() or not f.exists():
        return None
    return f.stat().st_size / 1e6


def only_links_into(links: Path, image: Path) -> bool:
    """Whether ``links`` holds nothing but symlinks to the files of ``image``."""
    entries = list(links.iterdir())
    return bool(entries) and all(
        f.is_symlink() and Path(os.readlink(f)).parent == image.resolve() for f in entries)


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
    memory image per resume of an engine checkpoint, a directory of symlinks per resume of
    Den's. (Den's reaper removes copies older than 10 minutes; it is off here.) This removes
    the copies of checkpoints this benchmark made (the same files, by :func:`fingerprint`),
    and only those, and counts them."""

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
        state = sh("docker", "inspect", "--format",
                   "{{.State.Status}} exit {{.State.ExitCode}} {{.State.Error}}", name).strip()
        if not state.startswith("running"):
            raise RuntimeError(f"{name} is not running right after docker run: {state}")

    def dev(self, cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "exec", *dev_exec_flags(), self.name, "bash", "-c", cmd],
                              capture_output=True, text=True)


def sandbox_pids(cid: str) -> set[int] | None:
    """The pids in a sandbox, read on the host with ``runsc ps`` the way Den does (nothing
    runs or is read inside the sandbox); None when runsc cannot say."""
    from server.runtime import docker, docker_specs

    rt = docker.DockerRuntime(gvisor_runtime="runsc")
    try:
        out = subprocess.run([rt._runsc, "--root", rt._runsc_root, "ps", cid],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        rt.close()
    if out.returncode != 0:
        return None
    return {pid for pid, _ in docker_specs.parse_runsc_ps(out.stdout)}


@dataclass
class Holder:
    """The memory-holding process of one side: its pid in the sandbox, and how it fared."""

    what: str
    cid: str
    pid: int
    checks: int = 0
    survived: int = 0
    lost_at: str = ""

    def check(self, when: str) -> bool:
        """Whether the holder is still there (same pid), read from the host."""
        if self.lost_at:
            return False
        self.checks += 1
        if self.pid in (sandbox_pids(self.cid) or set()):
            self.survived += 1
            return True
        self.lost_at = when
        print(f"  {self.what}: the memory holder (pid {self.pid}) is gone after {when}",
              file=sys.stderr, flush=True)
        return False


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


def wait_exited(name: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while sh("docker", "inspect", "-f", "{{.State.Running}}", name).strip() != "false":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: Docker did not see the checkpointed sandbox exit")
        time.sleep(0.02)


def quiet_s() -> float:
    """How long a side goes without exec before a timed pause: Den's pause then skips the
    settle step, as it does for a workspace the reaper pauses when idle."""
    from server.runtime import docker

    return float(docker.SETTLE_AFTER_EXEC_S) + QUIET_MARGIN_S


class Quiet:
    """When each side last ran an exec; :meth:`wait` sleeps (untimed) until it has been
    quiet for :func:`quiet_s`."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.gap = quiet_s()

    def note(self, what: str) -> None:
        self.last[what] = time.monotonic()

    def wait(self, what: str) -> None:
        left = self.last.get(what, 0.0) + self.gap - time.monotonic()
        if left > 0:
            time.sleep(left)


def bench_size(srv: PauseServer, prefix: str, repo: Path, root: Path, size_mb: int,
               rounds: int, later_cycles: int, res: Results, copies: TempCopies, *,
               breakdown: bool, alternatives: Path | None) -> dict[str, Any]:
    tag = label(size_mb)
    info: dict[str, Any] = {"size_mb": size_mb, "rounds": rounds, "later_cycles": later_cycles}

    # The Den workspace and the raw container, each holding the memory.
    wid = srv.create(f"pause-{size_mb}", repo)
    srv.wait_running(wid, poll_s=0.1, timeout_s=180)
    den_name = f"{prefix}-{wid}"
    den_id = sh("docker", "inspect", "--format", "{{.Id}}", den_name).strip()
    raw = RawContainer(prefix, f"{prefix}-raw-{size_mb}")
    quiet = Quiet()

    def den_run(cmd: str) -> tuple[int, str]:
        out = srv.exec_cmd(wid, cmd)
        quiet.note("den")
        return int(out["exit_code"]), str(out["stdout"]) + str(out["stderr"])

    def raw_run(cmd: str) -> tuple[int, str]:
        p = raw.dev(cmd)
        quiet.note("raw")
        return p.returncode, p.stdout + p.stderr

    sh("docker", "exec", raw.name, "true")  # booted before the memory is filled
    srv.exec_true(wid)
    quiet.note("raw")
    quiet.note("den")
    holders: dict[str, Holder] = {}
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
        for run, what, cid in ((den_run, "den", den_id), (raw_run, "raw", raw.id)):
            holders[what] = Holder(what, cid, int(run(f"cat {READY}")[1].strip()))
            if holders[what].pid not in (sandbox_pids(cid) or set()):
                raise RuntimeError(f"{what}: runsc ps does not show the memory holder")
    time.sleep(1)  # let the fill's page cache / allocator settle on both sides

    def survived(what: str, when: str) -> None:
        h = holders.get(what)
        if h is not None:
            res.add(f"{tag}: {what} holder still there (count)", float(h.check(when)))

    raw_cp = root / "containers" / raw.id / "checkpoints" / RAW_CHECKPOINT
    den_home = root / "containers" / den_id
    den_links = den_home / "checkpoints" / CHECKPOINT
    den_image = den_home / IMAGES_DIR / CHECKPOINT

    def raw_cycle(n: int) -> None:
        quiet.wait("raw")
        create = timed(lambda: sh("docker", "checkpoint", "create", raw.name, RAW_CHECKPOINT))
        # `checkpoint create` can return before the engine has seen the sandbox exit, and a
        # `start` then finds the container running and does nothing: wait, as Den does.
        exited = timed(lambda: wait_exited(raw.name))
        res.add(f"{tag}: raw checkpoint", create + exited)
        res.add(f"{tag}: raw: until Docker saw the exit after checkpoint create", exited)
        res.add(f"{tag}: raw checkpoint MB (count)", du_bytes(raw_cp) / 1e6)
        copies.remember(raw_cp)
        restore = timed(lambda: sh("docker", "start", "--checkpoint", RAW_CHECKPOINT, raw.name))
        first = timed(lambda: sh("docker", "exec", raw.name, "true"))
        quiet.note("raw")
        res.add(f"{tag}: raw restore", restore)
        res.add(f"{tag}: raw first exec", first)
        res.add(f"{tag}: raw restore + exec", restore + first)
        res.add(f"{tag}: raw: /tmp/ctrd-checkpoint copy left per restore, MB (count)",
                copies.sweep() / 1e6)
        survived("raw", f"raw cycle {n}")
        sh("docker", "checkpoint", "rm", raw.name, RAW_CHECKPOINT)

    def den_cycle(n: int, later: bool = False) -> None:
        key = f"{tag}: den later cycles:" if later else f"{tag}: den"
        quiet.wait("den")
        res.add(f"{key} pause", timed(lambda: srv.state_op(wid, "pause", "paused")))
        if not den_image.is_dir():
            raise RuntimeError(f"den: no checkpoint image at {den_image} while paused")
        if not only_links_into(den_links, den_image):
            raise RuntimeError(f"den: {den_links} holds more than links to {den_image}")
        res.add(f"{tag}: den checkpoint MB (count)", du_bytes(den_image) / 1e6)
        state = kernel_state_mb(den_image)
        if state is None:
            raise RuntimeError(f"den: {den_image} is not an uncompressed runsc image")
        res.add(f"{tag}: den {KERNEL_STATE} MB, cycle by cycle (count)", state)
        res.add(f"{tag}: den checkpoints/{CHECKPOINT} (links), bytes (count)",
                float(du_bytes(den_links)))
        copies.remember(den_links)
        resume = timed(lambda: srv.state_op(wid, "resume", "running"))
        first = timed(lambda: srv.exec_true(wid))
        quiet.note("den")
        res.add(f"{key} resume", resume)
        res.add(f"{key} first exec", first)
        res.add(f"{key} resume + exec", resume + first)
        res.add(f"{tag}: den: /tmp/ctrd-checkpoint copy left per restore, MB (count)",
                copies.sweep() / 1e6)
        ev = srv.events(wid)
        if not later:
            for to_state, what in (("paused", "den pause, server-side"),
                                   ("running", "den resume, server-side")):
                s = server_seconds(ev, to_state)
                if s is not None:
                    res.add(f"{tag}: {what}", s)
        if not any("restored from memory in" in (e.get("message") or "") for e in ev[-3:]):
            raise RuntimeError(f"den: resume did not restore from memory: {ev[-3:]}")
        survived("den", f"den {'later ' if later else ''}cycle {n}")

    def lost() -> bool:
        return any(h.lost_at for h in holders.values())

    for i in range(rounds):
        order = ((raw_cycle, den_cycle) if i % 2 == 0 else (den_cycle, raw_cycle))
        for cycle in order:
            cycle(i + 1)
        print(f"  {tag} round {i + 1}/{rounds}: "
              f"checkpoint raw {ms(res.samples[f'{tag}: raw checkpoint'][-1])}, "
              f"den pause {ms(res.samples[f'{tag}: den pause'][-1])}; "
              f"restore+exec raw {ms(res.samples[f'{tag}: raw restore + exec'][-1])}, "
              f"den resume+exec {ms(res.samples[f'{tag}: den resume + exec'][-1])}", flush=True)
        if lost():
            print(f"  {tag}: a memory holder is gone; no more rounds at this size",
                  file=sys.stderr, flush=True)
            break
    for i in range(later_cycles if not lost() else 0):
        den_cycle(rounds + i + 1, later=True)
    state = res.samples.get(f"{tag}: den {KERNEL_STATE} MB, cycle by cycle (count)", [])
    info["den_kernel_state_mb"] = [round(x, 3) for x in state]
    print(f"  {tag}: den {KERNEL_STATE} MB, cycle by cycle: "
          f"{', '.join(f'{x:.2f}' for x in state)}", flush=True)

    if breakdown and not lost():
        steps_breakdown(raw, root, tag, res, copies, lambda when: survived("raw", when))
    if alternatives is not None and not lost():
        alternatives_run(raw, root, tag, res, copies, alternatives,
                         lambda when: survived("raw", when))
    if size_mb and not lost():  # read in the sandbox once, at the end
        info["rss_after_kb"] = {"den": holder_rss_kb(den_run, "den"),
                                "raw": holder_rss_kb(raw_run, "raw")}
    info["holder"] = {h.what: {"checks": h.checks, "survived": h.survived,
                               "lost_at": h.lost_at or None} for h in holders.values()}
    srv.delete(wid)
    subprocess.run(["docker", "rm", "-f", raw.name], capture_output=True)
    subprocess.run(["docker", "volume", "rm", "-f", f"{raw.name}-data"], capture_output=True)
    if alternatives is not None:
        shutil.rmtree(alternatives, ignore_errors=True)
    return info


def mirrors_den_pause() -> str:
    """An empty string when ``DockerRuntime.pause`` still does what the breakdown times; else
    what changed."""
    from server.runtime import docker

    src = inspect.getsource(docker.DockerRuntime.pause)
    missing = [s for s in ('"--compression=none"', "_quiesce", "_link_image",
                           "_delete_checkpoint") if s not in src]
    if docker.IMAGES_DIR != IMAGES_DIR:
        missing.append(f"IMAGES_DIR {IMAGES_DIR!r}")
    return ", ".join(missing)


def steps_breakdown(raw: RawContainer, root: Path, tag: str, res: Results, copies: TempCopies,
                    survived: Callable[[str], None], cycles: int = 4) -> None:
    """``DockerRuntime.pause`` and ``resume`` taken apart, run on the raw container with the
    server's own methods and its runsc command. Even cycles pause after a quiet moment (no
    settle step), odd ones right after an exec (the settle exec runs, as in ``_quiesce``)."""
    from server.runtime import docker, docker_specs
    from server.runtime.base import ExecRequest, WorkspaceSpec

    changed = mirrors_den_pause()
    if changed:
        print(f"  {tag}: DockerRuntime.pause changed ({changed} not found); the breakdown "
              "may no longer mirror it", file=sys.stderr, flush=True)
    rt = docker.DockerRuntime(gvisor_runtime="runsc")
    api = rt._api()
    spec = WorkspaceSpec(workspace_id="raw",
                         handle={"container": raw.name, "volume": f"{raw.name}-data"},
                         image=IMAGE, runtime="gvisor",
                         cpus=CPUS, memory_mb=MEMORY_MB, pids_limit=PIDS, hostname="raw",
                         labels={})
    cid = raw.id
    home = root / "containers" / cid
    image = home / IMAGES_DIR / CHECKPOINT
    links = home / "checkpoints" / CHECKPOINT
    settle = ExecRequest(argv=docker_specs.settle_argv(), user="root", cwd="/")
    noop = ExecRequest(argv=["true"], user="root", cwd="/")
    first = ExecRequest(argv=["true"], cwd="/workspace", timeout_s=600)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(5):  # on the running sandbox
            res.add(f"{tag}: steps: runsc ps (running sandbox)",
                    timed(lambda: rt._sandbox_processes(cid)))
            res.add(f"{tag}: steps: helper exec of `true` (for comparison)",
                    timed(lambda: rt._exec_blocking(spec, noop)))
        for i in range(cycles):
            after_exec = i % 2 == 1
            key = f"{tag}: steps: pause {'right after an exec' if after_exec else 'when quiet'}:"
            if after_exec:
                rt._exec_blocking(spec, noop)  # an agent's last command, just before
            else:
                time.sleep(quiet_s())
            t_all = time.perf_counter()
            res.add(f"{key} inspect", timed(lambda: api.inspect_container(raw.name)))
            res.add(f"{key} delete the previous checkpoint and image",
                    timed(lambda: rt._delete_checkpoint(cid, CHECKPOINT)))
            t0 = time.perf_counter()
            strays = docker_specs.exec_processes(rt._sandbox_processes(cid) or [])
            res.add(f"{key} runsc ps (exec'd processes?)", time.perf_counter() - t0)
            res.add(f"{key} exec'd processes found (count)", float(len(strays)))
            if strays:  # as _quiesce: kill each from the host, wait until they are reaped
                t0 = time.perf_counter()
                for pid in strays:
                    subprocess.run([rt._runsc, "--root", rt._runsc_root, "kill", "--pid",
                                    str(pid), cid, "KILL"], capture_output=True, timeout=10,
                                   check=False)
                rt._wait_for_exec_processes(cid)
                res.add(f"{key} runsc kill + wait", time.perf_counter() - t0)
            if strays or rt._exec_recently(raw.name):
                res.add(f"{key} settle exec", timed(lambda: rt._exec_blocking(spec, settle)))
                res.add(f"{key} wait for exec'd processes (runsc ps)",
                        timed(lambda: rt._wait_for_exec_processes(cid)))
            image.mkdir(parents=True)

            def checkpoint() -> None:
                done = subprocess.run(
                    [*rt._runsc_command(), "checkpoint", "--compression=none",
                     "--image-path", str(image), cid],
                    capture_output=True, text=True, timeout=docker.CHECKPOINT_TIMEOUT_S)
                if done.returncode != 0:
                    raise RuntimeError(f"runsc checkpoint of {raw.name}: {done.stderr[-500:]}")

            def exited() -> None:  # as DockerRuntime.pause polls
                for _ in range(200):
                    if not api.inspect_container(raw.name)["State"].get("Running"):
                        return
                    time.sleep(0.05)
                raise RuntimeError(f"{raw.name} still runs after its checkpoint")

            res.add(f"{key} runsc checkpoint --compression=none", timed(checkpoint))
            res.add(f"{key} until Docker saw the exit", timed(exited))
            res.add(f"{key} link the image into checkpoints/",
                    timed(lambda: docker._link_image(image, links)))
            res.add(f"{key} total", time.perf_counter() - t_all)
            state = kernel_state_mb(image)
            if state is not None:
                res.add(f"{key} {KERNEL_STATE} MB (count)", state)
                res.add(f"{tag}: steps: {KERNEL_STATE} MB, cycle by cycle (count)", state)
            copies.remember(links)
            res.add(f"{tag}: steps: resume: DockerRuntime.resume (inspect + start)",
                    timed(lambda: loop.run_until_complete(rt.resume(spec,
                                                                    checkpoint=CHECKPOINT))))
            res.add(f"{tag}: steps: resume: first exec (DockerRuntime.exec)",
                    timed(lambda: loop.run_until_complete(rt.exec(spec, first))))
            copies.sweep()
            survived(f"breakdown cycle {i + 1}")
    finally:
        loop.close()
        rt.close()


# What Den could write instead of its uncompressed image: (name, runsc checkpoint flags).
ALTERNATIVES = (
    ("flate-best-speed (runsc's default)", ["--compression=flate-best-speed"]),
    ("none --direct", ["--compression=none", "--direct"]),
    ("none --exclude-committed-zero-pages",
     ["--compression=none", "--exclude-committed-zero-pages"]),
)


def alternatives_run(raw: RawContainer, root: Path, tag: str, res: Results,
                     copies: TempCopies, images: Path, survived: Callable[[str], None]) -> None:
    """Den's path with other ``runsc checkpoint`` flags, on the raw container: the image
    written by runsc under ``images``, a checkpoint directory of symlinks to it, restored
    with ``docker start --checkpoint``. No quiesce: the raw container has no exec'd processes
    left after a quiet moment."""
    from server.runtime import docker

    rt = docker.DockerRuntime(gvisor_runtime="runsc")
    try:
        runsc = rt._runsc_command()
    finally:
        rt.close()
    for n, (mode, flags) in enumerate(ALTERNATIVES):
        image = images / f"{tag.replace(' ', '')}-{n}"
        shutil.rmtree(image, ignore_errors=True)
        image.mkdir(parents=True)
        key = f"{tag}: alt: {mode}:"
        time.sleep(quiet_s())
        res.add(f"{key} runsc checkpoint", timed_sh(
            *runsc, "checkpoint", *flags, "--image-path", str(image), raw.id))
        res.add(f"{key} until Docker saw the exit", timed(lambda: wait_exited(raw.name)))
        res.add(f"{key} image MB (count)", du_bytes(image) / 1e6)
        state = kernel_state_mb(image)
        if state is not None:
            res.add(f"{key} {KERNEL_STATE} MB (count)", state)
        name = f"den-alt-{n}"
        links = root / "containers" / raw.id / "checkpoints" / name
        docker._link_image(image, links)
        copies.remember(links)
        res.add(f"{key} docker start --checkpoint (symlinked image)",
                timed_sh("docker", "start", "--checkpoint", name, raw.name))
        res.add(f"{key} first exec", timed_sh("docker", "exec", raw.name, "true"))
        copies.sweep()
        survived(f"alternative {mode}")
        sh("docker", "checkpoint", "rm", raw.name, name)
        # runsc may still read pages from the image it restored: each stays until the next
        # checkpoint has been written, the last one until the container is gone.
        if n:
            shutil.rmtree(images / f"{tag.replace(' ', '')}-{n - 1}", ignore_errors=True)


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
                f"{r['den_resume_exec_s']:.2f} s (raw restore + exec "
                f"{r['raw_restore_exec_s']:.2f} s)",
                r["den_resume_exec_s"] < IDLE_RESUME_GOAL_S)
        if r["size_mb"] >= 1024:
            gib = r["size_mb"] / 1024
            den, rawv = r["den_pause_s"] / gib, r["raw_checkpoint_s"] / gib
            add(f"{t}: pause at least as fast as E2B's {E2B_S_PER_GIB:g} s/GiB",
                f"Den {den:.1f} s/GiB (raw Docker checkpoint {rawv:.1f} s/GiB)",
                den <= E2B_S_PER_GIB)
    return "\n".join(out), found


def kernel_state(res: Results, sizes: list[int]) -> tuple[str, list[dict[str, Any]]]:
    """checkpoint.img across Den's cycles, per size: first, last and the largest step."""
    out, found = [], []
    for size in sizes:
        t = label(size)
        xs = res.samples.get(f"{t}: den {KERNEL_STATE} MB, cycle by cycle (count)", [])
        if not xs:
            continue
        growth = xs[-1] - xs[0]
        found.append({"size_mb": size, "mb": xs, "growth_mb": growth})
        out.append(f"- {t}: {len(xs)} cycles, {xs[0]:.2f} -> {xs[-1]:.2f} MB "
                   f"({growth:+.2f} MB, {growth / max(1, len(xs) - 1):+.3f} MB a cycle)")
        steps = res.samples.get(f"{t}: steps: {KERNEL_STATE} MB, cycle by cycle (count)", [])
        if steps:
            found[-1]["breakdown_mb"] = steps
            out.append(f"  breakdown on the raw container, quiet / after an exec (settle) "
                       f"alternating: {', '.join(f'{x:.2f}' for x in steps)} MB")
    return "\n".join(out), found


def details(res: Results, title: str) -> str:
    out = [title]
    width = max((len(k) for k in res.samples), default=0)
    for k, v in res.samples.items():
        if k.endswith("(count)"):
            out.append(f"  {k:<{width}}  median {median(v):8.2f}     max {max(v):8.2f}  "
                       f"n={len(v)}")
        else:
            out.append(f"  {k:<{width}}  median {ms(median(v)):>8}  p90 {ms(p90(v)):>8}  "
                       f"n={len(v)}")
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------------


def pause_code() -> str:
    """Which pause this run measured (the server code changes): how it checkpoints, and the
    settle step's script hash and when it runs."""
    from server.runtime import docker, docker_specs

    digest = hashlib.sha256(docker_specs.SETTLE_SCRIPT.encode()).hexdigest()[:10]
    changed = mirrors_den_pause()
    how = (f"changed, lacks {changed}" if changed else
           "runsc checkpoint --compression=none, image linked into checkpoints/")
    return (f"{how}; settle script sha256 {digest} only within {docker.SETTLE_AFTER_EXEC_S:g} s "
            "of an exec")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_pause",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3,
                    help="pause/resume rounds per size below 1 GiB (3)")
    ap.add_argument("--big-rounds", type=int, default=2,
                    help="rounds for sizes of 1 GiB and more (2; the raw engine takes "
                         "20-40 s each way per round)")
    ap.add_argument("--later-cycles", type=int, default=5,
                    help="further Den-only pause/resume cycles per size after the rounds: "
                         "do later ones get slower, does checkpoint.img grow? (5)")
    ap.add_argument("--sizes", default="idle,256,1024",
                    help="memory held in the workspace, MiB, comma-separated; 'idle' holds "
                         "nothing extra (idle,256,1024)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip timing Den's pause/resume steps on the raw container")
    ap.add_argument("--alternatives", action="store_true",
                    help="also time, on the raw container, other runsc checkpoint flags "
                         "through Den's symlinked path (flate, --direct, "
                         "--exclude-committed-zero-pages)")
    args = ap.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: expected 'idle' or MiB, got {args.sizes!r}")
    if any(s < 0 or s > MEMORY_MB - 512 for s in sizes):
        ap.error(f"--sizes: each must be between 0 and {MEMORY_MB - 512} MiB")

    run = start_run("pause")
    if run is None:
        return 2
    prefix, work, repos_root, started = run.prefix, run.work, run.repos_root, run.started
    load_before = [round(x, 2) for x in os.getloadavg()]
    res = Results()
    copies = TempCopies()
    infos: list[dict[str, Any]] = []
    srv: PauseServer | None = None
    failed = 0
    print(f"bench: prefix {prefix}, sizes {', '.join(label(s) for s in sizes)}, "
          f"{args.rounds} rounds ({args.big_rounds} at 1 GiB and more), "
          f"{args.later_cycles} later Den cycles, load {load_before}", flush=True)
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
                    srv, prefix, repo, root, size, rounds, max(0, args.later_cycles), res,
                    copies, breakdown=not args.no_breakdown,
                    alternatives=work / "images" if args.alternatives else None))
    except BaseException as exc:
        failed = report_failure(exc, srv)
    finally:
        finish_run(prefix, work, srv, copies.sweep)
        if copies.removed:
            print(f"bench: removed {copies.removed} copies of its checkpoints that containerd "
                  f"left in /tmp ({copies.removed_bytes / 1e6:.0f} MB)", flush=True)
    if failed:
        return failed

    text, rows = table(res, sizes)
    goal_text, goal_rows = goals(rows)
    state_text, state_rows = kernel_state(res, sizes)
    info = machine()
    info["loadavg_before"] = load_before
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    info["pause_code"] = pause_code()
    print()
    print(f"Pause/resume, Den vs raw engine, {started:%Y-%m-%d %H:%M} UTC, {info['cpus']} CPUs, "
          f"{info['os']}, Docker {info['docker']}, {info['runsc']}, load (1/5/15 min) "
          f"{load_before} -> {info['loadavg_after']}, code {info['git']}")
    print(f"runtimes: {info['runtimes']}")
    print(f"DockerRuntime.pause: {info['pause_code']}")
    print(text)
    print("(medians, p90 in brackets; restore+exec = `docker start --checkpoint` + "
          "`docker exec true`; Den = POST resume + POST exec true; checkpoint MB: du -sb of "
          "the raw engine's checkpoint and of Den's image)")
    print()
    print("Goals:")
    print(goal_text)
    print()
    print(f"Den's {KERNEL_STATE} (saved kernel state) across its cycles:")
    print(state_text)
    if any(i.get("holder") for i in infos):
        print()
        print("Memory holders (same pid, from runsc ps, after every restore):")
    for i in infos:
        for what, h in (i.get("holder") or {}).items():
            lost = f", lost after {h['lost_at']}" if h["lost_at"] else ""
            print(f"- {label(i['size_mb'])} {what}: there after {h['survived']} of "
                  f"{h['checks']} restores{lost}")
    print()
    print(details(res, "Details (medians and p90 per sample):"))
    for i in infos:
        if "fill_s" in i:
            rss = i["rss_kb"]
            after = i.get("rss_after_kb") or {}
            print(f"  {label(i['size_mb'])}: filled both in {i['fill_s']:.1f} s; holder RSS "
                  f"den {rss['den'] / 1024:.0f} MiB, raw {rss['raw'] / 1024:.0f} MiB; after "
                  f"the last restore den {after.get('den', 0) / 1024:.0f} MiB, raw "
                  f"{after.get('raw', 0) / 1024:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({
            "started_at": started.isoformat(), "machine": info, "sizes_mb": sizes,
            "rounds": args.rounds, "big_rounds": args.big_rounds,
            "later_cycles": args.later_cycles, "table": rows, "goals": goal_rows,
            "kernel_state": state_rows, "sizes": infos,
            "tmp_copies_removed": {"count": copies.removed, "bytes": copies.removed_bytes},
            "details": res.summary(),
            "samples": res.samples,
        }, indent=2))
        print(f"\nbench: wrote {args.json}")
    holders_lost = [f"{label(i['size_mb'])} {w}" for i in infos
            for w, h in (i.get("holder") or {}).items() if h["lost_at"]]
    if holders_lost:
        print(f"bench: memory holders lost: {', '.join(holders_lost)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
