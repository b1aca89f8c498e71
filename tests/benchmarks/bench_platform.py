"""gVisor's platforms side by side: systrap (runsc's default) against ptrace, by what an idle
sandbox costs and by speed under real work, in one run.

    .venv/bin/python -m tests.benchmarks.bench_platform [--idle N] [--window S] [--rounds R]
        [--runtimes runsc,runsc-ptrace] [--json out.json]

(docs/benchmarks.md, "Sleep tiers and idle cost", explains the results.)

Each runtime named in ``--runtimes`` must be registered with the engine (``make setup``
registers ``runsc`` and, with DEN_SETUP_PTRACE=1, ``runsc-ptrace``: the same runsc with
``--platform=ptrace``). For each it runs raw sandboxes with the spec Den builds for a workspace
(``raw_run_flags``; only the runtime differs) and Den's init as their main process:

- **idle**: N sandboxes doing nothing; the CPU their cgroups use over a window
  (``cpuacct.usage``, read on the host: other work on the machine does not count), as a
  percentage of the whole machine;
- **work** in one sandbox, rounds alternating which runtime goes first: a compile
  (``python3 -m compileall -f`` of a copy of the standard library), a test run (``unittest``
  over 40 generated modules of 25 tests each, touching files, JSON and regular expressions),
  ``git status`` on a repository of 20,000 files (made untimed), and ``docker exec true``.

Every container and volume it makes carries the prefix ``denbench-platform-*`` and is removed
at the end. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import statistics
import subprocess
import sys
import time
from typing import Any

from tests.benchmarks.bench_sleep import full_id, machine_percent
from tests.benchmarks.bench_workspaces import IMAGE, machine, raw_run_flags

SETUP_TESTS = r"""
set -e
mkdir -p /tmp/t && cd /tmp/t
for m in $(seq 1 40); do
  {
    echo 'import json, os, re, tempfile, unittest'
    echo 'class T(unittest.TestCase):'
    for t in $(seq 1 25); do
      echo "    def test_$t(self):"
      echo "        d = {'k': list(range($t * 10)), 's': 'x' * $t}"
      echo "        with tempfile.NamedTemporaryFile('w+', dir='/tmp/t') as f:"
      echo "            json.dump(d, f); f.flush(); f.seek(0)"
      echo "            self.assertEqual(json.load(f), d)"
      echo "        self.assertTrue(re.fullmatch(r'x+', d['s']))"
    done
  } > test_m$m.py
done
cp -r /usr/lib/python3.11 /tmp/stdlib
mkdir -p /tmp/big && cd /tmp/big && git init -q
for d in $(seq 1 100); do mkdir -p d$d; for f in $(seq 1 200); do echo $d$f > d$d/f$f; done; done
git add -A && git -c user.name=b -c user.email=b@b commit -q -m big && git status >/dev/null
"""

WORK = {
    "compile (compileall of the stdlib)": "python3 -m compileall -f -q /tmp/stdlib >/dev/null",
    "test run (unittest, 1,000 tests)": "cd /tmp/t && python3 -m unittest -q 2>/dev/null",
    "git status, 20,000 files": "cd /tmp/big && git status --porcelain >/dev/null",
    "exec true": "true",
}


def sh(*argv: str, timeout: float = 600) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=timeout).stdout


def run(name: str, runtime: str) -> str:
    from server.runtime import docker_specs

    flags = [f if not f.startswith("--runtime=") else f"--runtime={runtime}"
             for f in raw_run_flags(f"{name}-data")]
    sh("docker", "run", "-d", "--name", name, *flags, IMAGE, *docker_specs.INIT_COMMAND)
    return name


def timed_exec(name: str, cmd: str) -> float:
    t0 = time.perf_counter()
    sh("docker", "exec", "-u", "root", name, "sh", "-c", cmd)
    return time.perf_counter() - t0


def remove(names: list[str]) -> None:
    for n in names:
        subprocess.run(["docker", "rm", "-f", n], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "-f", f"{n}-data"], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_platform")
    ap.add_argument("--idle", type=int, default=10)
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtimes", default="runsc,runsc-ptrace")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    runtimes = args.runtimes.split(",")
    known = json.loads(sh("docker", "info", "--format", "{{json .Runtimes}}"))
    missing = [r for r in runtimes if r not in known]
    if missing:
        print(f"bench: runtimes {missing} are not registered with the engine", file=sys.stderr)
        return 2
    prefix = f"denbench-platform-{secrets.token_hex(3)}"
    made: list[str] = []
    result: dict[str, Any] = {"machine": machine(), "idle_n": args.idle, "idle": {},
                              "work": {}}
    try:
        # Every sandbox is made first, in one go: a runtime is needed only to create one.
        workers = {rt: run(f"{prefix}-{rt}-work", rt) for rt in runtimes}
        made += list(workers.values())
        idle = {rt: [run(f"{prefix}-{rt}-idle{i}", rt) for i in range(args.idle)]
                for rt in runtimes}
        for names in idle.values():
            made += names
        for names in idle.values():
            for n in names:
                sh("docker", "exec", n, "true")
        time.sleep(5)  # booted: boot CPU is not idle CPU
        for rt, names in idle.items():  # idle cost, one set at a time, the others idle too
            result["idle"][rt] = machine_percent([full_id(n) for n in names], args.window)
        for names in idle.values():
            remove(names)
        for name in workers.values():
            sh("docker", "exec", "-u", "root", name, "sh", "-c", SETUP_TESTS, timeout=1200)
        samples: dict[str, dict[str, list[float]]] = {
            rt: {k: [] for k in WORK} for rt in runtimes}
        for i in range(args.rounds):
            order = runtimes if i % 2 == 0 else list(reversed(runtimes))
            for what, cmd in WORK.items():
                for rt in order:
                    samples[rt][what].append(timed_exec(workers[rt], cmd))
        result["work"] = {rt: {k: statistics.median(v) for k, v in per.items()}
                          for rt, per in samples.items()}
    finally:
        with contextlib.suppress(Exception):
            remove(made)
    print(json.dumps(result, indent=2))
    base = runtimes[0]
    for rt in runtimes[1:]:
        print(f"\n{rt} against {base}: idle {result['idle'][rt]:.2f}% vs "
              f"{result['idle'][base]:.2f}% of the machine for {args.idle} sandboxes")
        for what in WORK:
            a, b = result["work"][base][what], result["work"][rt][what]
            print(f"  {what}: {b:.3f} s vs {a:.3f} s ({b / a:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
