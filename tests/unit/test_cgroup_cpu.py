"""Waiting for a sandbox's cgroup to go idle (server/runtime/cgroup_cpu.py), on a scripted
clock and usage."""

from __future__ import annotations

from pathlib import Path

from server.runtime.cgroup_cpu import usage_file, usage_ns, wait_idle

MS = 1_000_000  # nanoseconds


class Clock:
    """A clock that moves only when slept on, and a usage that follows a script of CPU
    milliseconds per 100 ms window (the last one repeats)."""

    def __init__(self, per_window_ms: list[float]) -> None:
        self.now = 0.0
        self.used = 0.0
        self.script = per_window_ms
        self.windows = 0

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.used += self.script[min(self.windows, len(self.script) - 1)] * MS
        self.windows += 1

    def read(self) -> int:
        return int(self.used)


def test_a_busy_boot_is_waited_out_until_three_calm_windows_in_a_row() -> None:
    c = Clock([130, 150, 120, 4, 5, 90, 3, 6, 4, 5])
    assert wait_idle(c.read, timeout_s=10, clock=lambda: c.now, sleep=c.sleep)
    assert c.windows == 9  # the calm pair before the 90 ms window did not count


def test_a_sandbox_that_stays_busy_times_out() -> None:
    c = Clock([40])
    assert not wait_idle(c.read, timeout_s=2, clock=lambda: c.now, sleep=c.sleep)
    assert 19 <= c.windows <= 21


def test_usage_that_cannot_be_read_is_not_idle() -> None:
    assert not wait_idle(lambda: None, timeout_s=1, clock=lambda: 0.0, sleep=lambda s: None)


def test_usage_files_of_both_cgroup_versions(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cgroup").write_text("4:cpu,cpuacct:/docker/abc\n1:name=systemd:/x\n")
    (proc / "8").mkdir()
    (proc / "8" / "cgroup").write_text("0::/system.slice/docker-abc.scope\n")
    root = tmp_path / "cg"
    v1 = usage_file(7, proc=proc, root=root)
    v2 = usage_file(8, proc=proc, root=root)
    assert v1 == root / "cpuacct" / "docker" / "abc" / "cpuacct.usage"
    assert v2 == root / "system.slice" / "docker-abc.scope" / "cpu.stat"
    assert usage_file(9, proc=proc, root=root) is None
    for path, text in ((v1, "123456789\n"), (v2, "usage_usec 123456\nuser_usec 1\n")):
        assert path is not None
        path.parent.mkdir(parents=True)
        path.write_text(text)
    assert v1 is not None and usage_ns(v1) == 123456789
    assert v2 is not None and usage_ns(v2) == 123456000
    assert usage_ns(root / "missing" / "cpuacct.usage") is None
