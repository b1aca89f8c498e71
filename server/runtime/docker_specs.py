"""Pure builders for the Docker backend: specs as plain data, no I/O (tested by equality)."""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.gpus import container as gpu_container
from server.gpus.container import GpuSandbox
from server.runtime.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_ROLE,
    LABEL_WORKSPACE,
    ROLE_COPY,
    ExecRequest,
    SnapshotSpec,
    WorkspaceSpec,
)

WORKSPACE_MOUNT = "/workspace"


# --- the names of Den's engine objects: the Docker backend's handles ----------------------


def new_handle(prefix: str, workspace_id: str) -> dict[str, str]:
    """A new workspace's container and its /workspace volume."""
    return {"container": f"{prefix}-{workspace_id}", "volume": f"{prefix}-{workspace_id}-data"}


def restore_handle(spec: WorkspaceSpec, prefix: str) -> dict[str, str]:
    """The handle a restore switches to: the same container, on a new volume that the
    snapshot's data is copied into (beside the current one until the switch)."""
    return {**spec.handle, "volume": f"{prefix}-{spec.workspace_id}-data-{secrets.token_hex(3)}"}


def container_of(spec: WorkspaceSpec) -> str:
    return str(spec.handle["container"])


def volume_of(spec: WorkspaceSpec) -> str:
    return str(spec.handle["volume"])


def new_snapshot(prefix: str, snapshot_id: str, labels: Mapping[str, str]) -> SnapshotSpec:
    """A snapshot: the container's filesystem committed as an image, /workspace copied into a
    volume."""
    return SnapshotSpec(snapshot_id=snapshot_id, image=f"{prefix}-snapshot:{snapshot_id}",
                        handle={"image": f"{prefix}-snapshot:{snapshot_id}",
                                "volume": f"{prefix}-{snapshot_id}-snap"},
                        labels=labels)


def snapshot_volume(snap: SnapshotSpec) -> str:
    return str(snap.handle["volume"])

# PID 1 of every workspace: the image's den-init when it has one (it starts the services a
# workspace needs, like the sudo broker and dev's tmux server), else a plain sh loop that
# sleeps forever, so that any image works. Both exit at once on SIGTERM, so stop is fast.
INIT_COMMAND = [
    "/bin/sh",
    "-c",
    "[ -x /usr/local/bin/den-init ] && exec /usr/local/bin/den-init; "
    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
]

# Grace given to a timed-out command between SIGTERM and SIGKILL.
KILL_AFTER_S = 2

# Under gVisor (systrap) every sandbox process costs the host about two pids, and the whole
# sandbox dies when the host's pids cgroup is full. So the workspace's process limit is
# enforced inside the sandbox (RLIMIT_NPROC, per user) and the host limit leaves room above it.
HOST_PIDS_PER_PROCESS = 4


def memory_headroom_mb(memory_mb: int) -> int:
    """Memory the container gets above the workspace's limit. The host kills the whole
    sandbox at its cgroup limit, so Den's memory guard (server/workspaces/memory_guard.py),
    or earlyoom inside where the host cannot watch (cgroup v2), ends the biggest process
    once usage passes ``memory_mb``, before that."""
    return max(256, memory_mb // 4)


# Privileges a workspace never needs (issue 11, finding 8): no raw sockets, device nodes,
# audit records or file capabilities; and no gaining privileges through exec. What the image's
# sudo broker (root, starting commands as root or another user: SETUID, SETGID) and package
# installs (CHOWN, DAC_OVERRIDE, FOWNER, FSETID) use stays.
CAP_DROP = ["NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP"]
SECURITY_OPT = ["no-new-privileges"]

# With the agent (docs/agent.md), PID 1 is the agent's init, mounted read-only from the host;
# it starts the image's den-init when there is one. Den reaches the agent through an engine
# exec of `den-agent relay` per session (never through PID 1's stdio: see agent/relay.go).
AGENT_MOUNT = "/.den"
AGENT_COMMAND = [f"{AGENT_MOUNT}/current/den-agent", "init", "--", "/usr/local/bin/den-init"]
LABEL_AGENT = "den.agent"


def container_config(spec: WorkspaceSpec, *, gvisor_runtime: str, agent_dir: str | None = None,
                     network: str | None = None, resolv_conf: str | None = None,
                     gpu: GpuSandbox | None = None, host_memory_guard: bool = True
                     ) -> dict[str, Any]:
    """Arguments of ``APIClient.create_container`` (host_config as a plain dict). With
    ``network`` the container joins Den's own bridge; ``resolv_conf`` then replaces the one
    the engine would write: on a user-defined network the engine names its embedded DNS
    server (127.0.0.11, answered inside the container's network namespace), which gVisor's
    own network stack never reaches (measured: no name resolves). ``host_memory_guard``: Den's
    memory guard can watch the sandbox's cgroup (cgroup v1); the workspace is told so
    (``DEN_MEMORY_GUARD=host``) and den-init starts no earlyoom of its own."""
    runtime = gvisor_runtime if spec.runtime == "gvisor" else "runc"
    memory_bytes = (spec.memory_mb + memory_headroom_mb(spec.memory_mb)) * 1024 * 1024
    host_config: dict[str, Any] = {
        "runtime": runtime,
        "binds": {volume_of(spec): {"bind": WORKSPACE_MOUNT, "mode": "rw"}},
        "nano_cpus": int(spec.cpus * 1_000_000_000),
        "mem_limit": memory_bytes,
        "memswap_limit": memory_bytes,
        "pids_limit": spec.pids_limit * HOST_PIDS_PER_PROCESS,
        "ulimits": [{"Name": "nproc", "Soft": spec.pids_limit, "Hard": spec.pids_limit}],
        "privileged": False,
        "cap_add": None,
        "cap_drop": CAP_DROP,
        "security_opt": SECURITY_OPT,
        "init": False,
        "restart_policy": {"Name": "no"},
        "log_config": {"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}},
    }
    labels = dict(spec.labels)
    if agent_dir is not None:
        host_config["binds"][agent_dir] = {"bind": AGENT_MOUNT, "mode": "ro"}
        labels[LABEL_AGENT] = "1"
    if network is not None:
        host_config["network_mode"] = network
    if resolv_conf is not None:
        host_config["binds"][resolv_conf] = {"bind": "/etc/resolv.conf", "mode": "ro"}
    environment = {**spec.env, "DEN_MEMORY_MB": str(spec.memory_mb),
                   "DEN_PIDS": str(spec.pids_limit)}
    if host_memory_guard:
        environment["DEN_MEMORY_GUARD"] = "host"
    if spec.gpus:
        gpu_container.merge(host_config, environment, *gpu_container.gpu_config(
            spec.gpus, runtime=spec.runtime, sandbox=gpu or GpuSandbox()))
    return {
        "image": spec.image,
        "name": container_of(spec),
        "command": AGENT_COMMAND if agent_dir is not None else INIT_COMMAND,
        "hostname": spec.hostname,
        "labels": labels,
        "environment": environment,
        "working_dir": WORKSPACE_MOUNT,
        "host_config": host_config,
    }


LABEL_NETWORK = "den.network"


def network_config(name: str, *, interface: str, subnet: str = "") -> dict[str, Any]:
    """Arguments of ``APIClient.create_network`` but ``ipam``: Den's bridge, with a fixed
    interface name (the firewall matches it) and traffic between its containers off (the
    firewall rejects it too)."""
    return {
        "name": name,
        "driver": "bridge",
        "options": {"com.docker.network.bridge.name": interface,
                    "com.docker.network.bridge.enable_icc": "false"},
        "labels": {"den.managed": "true", LABEL_NETWORK: name},
        "subnet": subnet,
    }


def network_addresses(inspect: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(subnet, container name -> IPv4 address) from a network's inspect."""
    configs = (inspect.get("IPAM") or {}).get("Config") or []
    subnet = next((str(c["Subnet"]) for c in configs if "." in str(c.get("Subnet", ""))), "")
    found = {}
    for c in (inspect.get("Containers") or {}).values():
        addr = str(c.get("IPv4Address") or "").partition("/")[0]
        if addr and c.get("Name"):
            found[str(c["Name"])] = addr
    return subnet, found


def network_gateway(inspect: dict[str, Any]) -> str:
    """The IPv4 gateway (the host's address on the bridge) from a network's inspect."""
    configs = (inspect.get("IPAM") or {}).get("Config") or []
    return next((str(c["Gateway"]) for c in configs if "." in str(c.get("Gateway", ""))), "")


def veth_peer_index(ip_link: str) -> int | None:
    """The host-side peer's interface index from ``ip -o link show eth0`` run in a
    container's network namespace (``4451: eth0@if4452: ...`` -> 4452)."""
    match = re.search(r"^\d+: eth0@if(\d+):", ip_link.strip())
    return int(match.group(1)) if match else None


def copy_volume_config(*, image: str, runtime: str, src: str, dst: str, wipe: bool,
                       labels: Mapping[str, str]) -> dict[str, Any]:
    """A short-lived container that copies volume ``src`` into ``dst`` (emptied first when
    ``wipe``) and prints the bytes copied. It runs under gVisor with no network: the files
    are the workspace's, so untrusted."""
    script = ("set -e; " + ("find /to -mindepth 1 -delete; " if wipe else "")
              + "cp -a /from/. /to/; du -sb /to | cut -f1")
    return {
        "image": image,
        "command": ["/bin/sh", "-c", script],
        "user": "root",
        "labels": dict(labels),
        "network_disabled": True,
        "host_config": {
            "runtime": runtime,
            "binds": {src: {"bind": "/from", "mode": "ro"}, dst: {"bind": "/to", "mode": "rw"}},
            "privileged": False,
            "cap_drop": CAP_DROP,
            "security_opt": SECURITY_OPT,
        },
    }


def copy_helper_labels(labels: Mapping[str, str], *, workspace_id: str) -> dict[str, str]:
    """The labels of a volume-copy helper: Den's and the instance's, the workspace it works
    for (reconcile leaves the helper of a workspace with an operation in progress alone) and
    its role (any other helper is a crash's leftover, removed before the volumes it holds)."""
    kept = {k: v for k, v in labels.items() if k in (LABEL_MANAGED, LABEL_INSTANCE)}
    return {**kept, LABEL_WORKSPACE: workspace_id, LABEL_ROLE: ROLE_COPY}


# A pause's checkpoint is complete when this file exists beside its image directory: runsc
# is run by a shell that creates it once runsc succeeded, so that a checkpoint that completes
# after Den itself died (the shell and runsc outlive it) is still known to be whole.
COMPLETE_SUFFIX = ".complete"


def checkpoint_marker(image: Path) -> Path:
    return image.with_name(image.name + COMPLETE_SUFFIX)


def checkpoint_argv(runsc: Sequence[str], *, image: Path, cid: str) -> list[str]:
    """runsc checkpoint of container ``cid`` into ``image``, creating the completion marker
    when (and only when) it succeeds."""
    return ["/bin/sh", "-c", '"$@" && : > "$0"', str(checkpoint_marker(image)),
            *runsc, "checkpoint", "--compression=none", "--image-path", str(image), cid]


def runsc_failure(output: str, limit: int = 400) -> str:
    """What a failed ``runsc checkpoint`` says, for a person: the line that carries its error
    (runsc wraps it in "checkpoint failed: ...", and may follow it with a Go stack trace of
    its sandbox), else the output's last line. The whole output belongs in the log."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "checkpoint failed" in line:
            said = line[line.index("checkpoint failed"):]
            # The deepest cause is the part a person can act on.
            for cause in ("save rejected", "endpoint cannot be saved"):
                if cause in said:
                    said = said[said.index(cause):]
                    break
            return said[:limit]
    return lines[-1][:limit] if lines else ""


def snapshot_volume_config(snap: SnapshotSpec) -> dict[str, Any]:
    return {"name": snapshot_volume(snap), "driver": "local", "labels": dict(snap.labels)}


def volume_config(spec: WorkspaceSpec, *, name: str | None = None,
                  driver_opts: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Arguments of ``APIClient.create_volume``: the workspace's volume, or another of its
    volumes (a restore's new copy) named ``name``; ``driver_opts`` bind it to a directory
    (its disk image: server/runtime/disk_quota.py)."""
    cfg: dict[str, Any] = {"name": name or volume_of(spec), "driver": "local",
                           "labels": dict(spec.labels)}
    if driver_opts:
        cfg["driver_opts"] = dict(driver_opts)
    return cfg


def rename_script(etc: str = "/etc") -> str:
    """The shell of :func:`set_hostname_argv`: the kernel's name (``$1``; the one process it
    starts), ``etc``/hostname, and the ``etc``/hosts line that ends with the old name
    (``$2``) rewritten with shell builtins only (no ``sed``: each process costs ~20 ms under
    gVisor). The files are the engine's bind mounts, so they are rewritten in place, not
    replaced. Ends with status 0 only when all of it was done."""
    return ('hostname "$1" && printf "%s\\n" "$1" > ' + etc + '/hostname && hosts="" && '
            'while IFS= read -r line || [ -n "$line" ]; do '
            'case "$line" in *[[:space:]]"$2") line="${line%"$2"}$1";; esac; '
            'hosts="$hosts$line\n"; done < ' + etc + '/hosts && '
            'printf "%s" "$hosts" > ' + etc + '/hosts')


def set_hostname_argv(hostname: str, *, was: str) -> list[str]:
    """A root shell that renames a sandbox's host (the warm pool's claim): needs
    CAP_SYS_ADMIN, so a privileged exec (:func:`rename_script`)."""
    return ["/bin/sh", "-c", rename_script(), "den-hostname", hostname, was]


ARMED_READY = "den-rename-armed"
ARMED_DONE = "den-renamed"


def armed_hostname_argv(*, was: str) -> list[str]:
    """:func:`set_hostname_argv`'s shell, started ahead of time: it says ``ARMED_READY`` once
    it runs, reads the new name from its standard input (one line), renames and says
    ``ARMED_DONE`` when all of it succeeded (server/runtime/docker_rename.py: the claim
    need not wait for the engine to report the exec's end)."""
    script = (f'echo {ARMED_READY} && IFS= read -r name && [ -n "$name" ] && '
              f'set -- "$name" "$1" && {rename_script()} && echo {ARMED_DONE}')
    return ["/bin/sh", "-c", script, "den-hostname", was]


def exec_env(user: str, base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of an exec: sensible defaults, then the workspace's, then the call's."""
    home = "/root" if user == "root" else f"/home/{user}"
    env = {
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        "LANG": "C.UTF-8",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "TERM": "xterm-256color",
    }
    env.update(base)
    env.update(extra)
    return env


def exec_argv(req: ExecRequest) -> list[str]:
    """The argv actually run: the command under coreutils ``timeout`` when one is set, so that
    a timed-out command and all its children are killed inside the sandbox."""
    argv = list(req.argv)
    if req.timeout_s is None:
        return argv
    # On a terminal the command must stay in the terminal's foreground process group.
    fg = ["--foreground"] if req.tty else []
    return ["timeout", *fg, "-k", str(KILL_AFTER_S), f"{req.timeout_s:g}", *argv]


def parse_runsc_ps(table: str) -> list[tuple[int, int]]:
    """(pid, parent pid) of each process in ``runsc ps``'s table (UID PID PPID C ...)."""
    rows = []
    for line in table.splitlines()[1:]:
        cols = line.split()
        if len(cols) > 2 and cols[1].isdigit() and cols[2].isdigit():
            rows.append((int(cols[1]), int(cols[2])))
    return rows


def exec_processes(rows: Sequence[tuple[int, int]]) -> list[int]:
    """The processes started by exec and their descendants, from (pid, parent) pairs.

    In the sandbox an exec'd process has parent 0 (and is not PID 1, the container's main
    process). They hold the exec's host descriptors, which gVisor cannot restore ("no host FD
    available"), so they are ended before a checkpoint; everything descending from PID 1
    survives it."""
    parent = dict(rows)
    found = []
    for pid in parent:
        top, hops = pid, 0  # climb to the process whose parent is 0 or 1 (or unknown)
        while parent.get(top) not in (0, 1, None) and hops < len(parent):
            top, hops = parent[top], hops + 1
        if top != 1 and parent.get(top) == 0:
            found.append(pid)
    return sorted(found)


# Before a checkpoint that follows recent exec activity: wait (up to 3 s) until no process
# holds a host descriptor that PID 1 does not hold. A process still holding one at checkpoint
# time (tmux's server keeps an exec'd client's stdio for a moment after the client has gone)
# comes back frozen or not at all (measured: about half of the restores without this wait).
# The script first points its own stdio at /dev/null so that it holds none itself, and exits
# 3 when descriptors are still held at its deadline. It reads
# /proc, which grows the sandbox's saved kernel state by about 0.5 MB each time (measured:
# 1.3 MB per pause/resume cycle with a full /proc scan, nothing without), so the runtime runs
# it only when an exec ended a moment ago.
SETTLE_SCRIPT = r"""
exec </dev/null >/dev/null 2>&1
allowed=" $(ls -l /proc/1/fd | grep -o 'host:\[[0-9]*\]' | sort -u | tr '\n' ' ') "
i=0
while [ "$i" -lt 60 ]; do
  busy=0
  for h in $(ls -l /proc/[0-9]*/fd | grep -o 'host:\[[0-9]*\]' | sort -u); do
    case "$allowed" in *" $h "*) ;; *) busy=1 ;; esac
  done
  [ "$busy" = 0 ] && exit 0
  sleep 0.05
  i=$((i + 1))
done
exit 3
"""


def settle_argv() -> list[str]:
    return ["/bin/sh", "-c", SETTLE_SCRIPT]


EXEC_MARKER = "DEN_EXEC_ID"


def kill_marked_argv(marker: str) -> list[str]:
    """Kill every process whose environment carries ``DEN_EXEC_ID=<marker>``: a one-shot
    exec's command and all its children (they inherit the environment)."""
    script = (
        'for p in /proc/[0-9]*; do '
        f'if grep -qxz -- "{EXEC_MARKER}={shlex.quote(marker)}" "$p/environ" 2>/dev/null; '
        'then kill -KILL "${p#/proc/}" 2>/dev/null; fi; done; exit 0'
    )
    return ["/bin/sh", "-c", script]


def stream_argv(argv: Sequence[str], pidfile: str, size: tuple[int, int] | None = None
                ) -> list[str]:
    """Wrap a streamed command so its pid lands in ``pidfile`` (for kill on disconnect) and,
    on a terminal, the terminal has ``size`` (columns, rows) before the command starts."""
    script = f"echo $$ > {shlex.quote(pidfile)}; "
    if size is not None:
        script += f"stty cols {int(size[0])} rows {int(size[1])} 2>/dev/null; "
    return ["/bin/sh", "-c", script + 'exec "$@"', "den-exec", *argv]


def kill_argv(pidfile: str) -> list[str]:
    """Kill the process (and its process group) whose pid is in ``pidfile``."""
    q = shlex.quote(pidfile)
    script = (
        f"p=$(cat {q} 2>/dev/null) || exit 0; "
        "kill -KILL -- -$p 2>/dev/null; pkill -KILL -P $p 2>/dev/null; kill -KILL $p 2>/dev/null; "
        f"rm -f {q}; exit 0"
    )
    return ["/bin/sh", "-c", script]


def signal_argv(pidfile: str, name: str) -> list[str]:
    """Send signal ``name`` to the process group whose leader's pid is in ``pidfile``."""
    if not name.isalnum():
        raise ValueError(f"not a signal name: {name!r}")
    q = shlex.quote(pidfile)
    return ["/bin/sh", "-c", f"p=$(cat {q} 2>/dev/null) && kill -{name} -- -$p 2>/dev/null; exit 0"]
