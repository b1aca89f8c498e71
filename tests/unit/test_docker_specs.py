"""The Docker backend's pure builders, tested by equality (kubespawner's make_pod style)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from server.runtime import cgroup_memory, docker_specs
from server.runtime.base import ExecRequest, WorkspaceSpec, labels_for
from server.runtime.docker_specs import (
    INIT_COMMAND,
    container_config,
    exec_argv,
    exec_env,
    exec_processes,
    kill_argv,
    kill_marked_argv,
    memory_headroom_mb,
    parse_runsc_ps,
    runsc_failure,
    stream_argv,
    volume_config,
    volume_of,
)

LABELS = labels_for(instance="inst1", workspace_id="ws0123456789ab", owner="7")

SPEC = WorkspaceSpec(
    workspace_id="ws0123456789ab",
    handle={"container": "den-ws0123456789ab", "volume": "den-ws0123456789ab-data"},

    image="den/workspace:latest",
    runtime="gvisor",
    cpus=1.5,
    memory_mb=512,
    pids_limit=256,
    hostname="api",
    labels=LABELS,
    env={"FOO": "bar"},
)


def _expected(runtime: str) -> dict[str, object]:
    return {
        "image": "den/workspace:latest",
        "name": "den-ws0123456789ab",
        "command": INIT_COMMAND,
        "hostname": "api",
        "labels": {
            "den.managed": "true",
            "den.instance": "inst1",
            "den.workspace": "ws0123456789ab",
            "den.owner": "7",
        },
        "environment": {"FOO": "bar", "DEN_MEMORY_MB": "512", "DEN_PIDS": "256",
                        "DEN_MEMORY_GUARD": "host"},
        "working_dir": "/workspace",
        "host_config": {
            "runtime": runtime,
            "binds": {"den-ws0123456789ab-data": {"bind": "/workspace", "mode": "rw"}},
            "nano_cpus": 1_500_000_000,
            # 256 MiB above the workspace's limit, for the memory guard to act before the host does.
            "mem_limit": (512 + 256) * 1024 * 1024,
            "memswap_limit": (512 + 256) * 1024 * 1024,
            # Host pids: room for gVisor's own; the workspace's limit is RLIMIT_NPROC inside.
            "pids_limit": 256 * 4,
            "ulimits": [{"Name": "nproc", "Soft": 256, "Hard": 256}],
            "privileged": False,
            "cap_add": None,
            "cap_drop": ["NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP"],
            "security_opt": ["no-new-privileges"],
            "init": False,
            "restart_policy": {"Name": "no"},
            "log_config": {"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}},
        },
    }


def test_container_config_gvisor_uses_the_configured_runsc_name() -> None:
    assert container_config(SPEC, gvisor_runtime="runsc-debug") == _expected("runsc-debug")


def test_container_config_runc() -> None:
    spec = dataclasses.replace(SPEC, runtime="runc")
    assert container_config(spec, gvisor_runtime="runsc") == _expected("runc")


def test_container_config_never_grants_privileges_or_mounts_the_docker_socket() -> None:
    cfg = container_config(SPEC, gvisor_runtime="runsc")
    host = cfg["host_config"]
    assert host["privileged"] is False
    assert not host["cap_add"]
    assert "no-new-privileges" in host["security_opt"] and "NET_RAW" in host["cap_drop"]
    assert "devices" not in host
    assert "network_mode" not in host
    assert "pid_mode" not in host
    assert list(host["binds"]) == [volume_of(SPEC)]
    assert all("docker.sock" not in str(v) for v in host["binds"].values())


def test_container_config_copies_labels_and_env() -> None:
    cfg = container_config(SPEC, gvisor_runtime="runsc")
    cfg["labels"]["den.owner"] = "changed"
    cfg["environment"]["FOO"] = "changed"
    assert SPEC.labels["den.owner"] == "7"
    assert SPEC.env["FOO"] == "bar"


@pytest.mark.parametrize(("memory_mb", "headroom"), [(128, 256), (1024, 256), (8192, 2048)])
def test_memory_headroom(memory_mb: int, headroom: int) -> None:
    assert memory_headroom_mb(memory_mb) == headroom


def test_den_variables_win_over_user_env() -> None:
    spec = dataclasses.replace(SPEC, env={"DEN_MEMORY_MB": "1"})
    assert container_config(spec, gvisor_runtime="runsc")["environment"]["DEN_MEMORY_MB"] == (
        "512")


def test_the_workspace_is_told_whether_the_host_guards_its_memory(tmp_path: Path) -> None:
    """Where the host's cgroups take usage thresholds (v1) Den's memory guard watches the
    sandbox and den-init starts no earlyoom; elsewhere (v2) the workspace is not told so,
    and its earlyoom keeps a memory hog from getting the whole sandbox killed."""
    assert "DEN_MEMORY_GUARD" not in container_config(
        SPEC, gvisor_runtime="runsc", host_memory_guard=False)["environment"]
    assert not cgroup_memory.thresholds_available(tmp_path)
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "cgroup.event_control").write_text("")
    assert cgroup_memory.thresholds_available(tmp_path)


def test_volume_config() -> None:
    assert volume_config(SPEC) == {
        "name": "den-ws0123456789ab-data",
        "driver": "local",
        "labels": dict(LABELS),
    }
    opts = {"type": "none", "o": "bind", "device": "/d/v/workspace"}
    assert volume_config(SPEC, name="v2", driver_opts=opts) == {
        "name": "v2", "driver": "local", "labels": dict(LABELS), "driver_opts": opts}


def test_exec_argv_without_timeout_is_the_command() -> None:
    assert exec_argv(ExecRequest(argv=("ls", "-la"), timeout_s=None)) == ["ls", "-la"]


@pytest.mark.parametrize(("timeout_s", "shown"), [(30, "30"), (2.5, "2.5"), (600.0, "600")])
def test_exec_argv_with_timeout_runs_under_coreutils_timeout(timeout_s: float,
                                                             shown: str) -> None:
    req = ExecRequest(argv=["bash", "-c", "sleep 1"], timeout_s=timeout_s)
    assert exec_argv(req) == ["timeout", "-k", "2", shown, "bash", "-c", "sleep 1"]


def test_exec_env_defaults_for_dev() -> None:
    assert exec_env("dev", {}, {}) == {
        "HOME": "/home/dev",
        "USER": "dev",
        "LOGNAME": "dev",
        "LANG": "C.UTF-8",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "TERM": "xterm-256color",
    }


def test_exec_env_root_home() -> None:
    env = exec_env("root", {}, {})
    assert (env["HOME"], env["USER"]) == ("/root", "root")


def test_exec_env_precedence_call_over_workspace_over_defaults() -> None:
    env = exec_env(
        "dev",
        {"LANG": "de_DE.UTF-8", "A": "workspace", "B": "workspace"},
        {"B": "call", "C": "call", "TERM": "dumb"},
    )
    assert env["LANG"] == "de_DE.UTF-8"
    assert env["A"] == "workspace"
    assert env["B"] == "call"
    assert env["C"] == "call"
    assert env["TERM"] == "dumb"
    assert env["HOME"] == "/home/dev"


def test_stream_and_kill_argv_quote_the_pidfile() -> None:
    argv = stream_argv(["echo", "hi"], "/tmp/den exec.pid")
    assert argv == ["/bin/sh", "-c", "echo $$ > '/tmp/den exec.pid'; exec \"$@\"", "den-exec",
                    "echo", "hi"]
    kill = kill_argv("/tmp/den exec.pid")
    assert kill[:2] == ["/bin/sh", "-c"]
    assert "cat '/tmp/den exec.pid'" in kill[2]
    assert "rm -f '/tmp/den exec.pid'" in kill[2]


def test_a_terminal_stream_gets_its_size_before_the_command_starts() -> None:
    argv = stream_argv(["bash", "-l"], "/tmp/p", (123, 40))
    assert argv[2] == "echo $$ > /tmp/p; stty cols 123 rows 40 2>/dev/null; exec \"$@\""
    assert argv[3:] == ["den-exec", "bash", "-l"]


def test_a_timeout_on_a_terminal_keeps_the_command_in_the_foreground() -> None:
    req = ExecRequest(argv=("vim",), timeout_s=5, tty=True)
    assert exec_argv(req) == ["timeout", "--foreground", "-k", "2", "5", "vim"]


def test_kill_marked_argv_matches_the_whole_environment_entry() -> None:
    argv = kill_marked_argv("0123abcd")
    assert argv[:2] == ["/bin/sh", "-c"]
    assert 'grep -qxz -- "DEN_EXEC_ID=0123abcd" "$p/environ"' in argv[2]
    assert 'kill -KILL "${p#/proc/}"' in argv[2]


RUNSC_PS = """UID       PID       PPID      C         TTY       STIME     TIME      CMD
0         1         0         0         ?         15:40     10ms      den-init
1000      6         1         0         ?         15:40     0s        tmux
1000      7         6         0         pts/0     15:40     0s        bash
0         12        0         0         ?         15:41     0s        bash
0         14        12        0         ?         15:41     0s        sleep
0         15        14        0         ?         15:41     0s        sleep
0         20        0         0         pts/1     15:41     0s        bash
"""


def test_runsc_ps_is_read_as_pid_and_parent() -> None:
    assert parse_runsc_ps(RUNSC_PS) == [(1, 0), (6, 1), (7, 6), (12, 0), (14, 12), (15, 14),
                                        (20, 0)]
    assert parse_runsc_ps("") == []


def test_exec_processes_are_the_parentless_ones_and_their_children_not_pid_1s() -> None:
    assert exec_processes(parse_runsc_ps(RUNSC_PS)) == [12, 14, 15, 20]
    assert exec_processes([(1, 0), (6, 1)]) == []
    # A process whose parent is not listed (it exited meanwhile) is left alone.
    assert exec_processes([(1, 0), (9, 8)]) == []


def test_container_config_with_the_agent_mounts_it_read_only_and_runs_its_init() -> None:
    plain = container_config(SPEC, gvisor_runtime="runsc")
    cfg = container_config(SPEC, gvisor_runtime="runsc", agent_dir="/var/lib/den/agent")
    assert cfg["command"] == ["/.den/current/den-agent", "init", "--", "/usr/local/bin/den-init"]
    assert cfg["host_config"]["binds"] == {
        **plain["host_config"]["binds"],
        "/var/lib/den/agent": {"bind": "/.den", "mode": "ro"},
    }
    assert cfg["labels"] == {**plain["labels"], "den.agent": "1"}
    # Nothing else changes: the same limits, no privileges, no other mount.
    del cfg["host_config"]["binds"], plain["host_config"]["binds"]
    assert cfg["host_config"] == plain["host_config"]
    assert {k: v for k, v in cfg.items() if k not in ("command", "labels", "host_config")} == {
        k: v for k, v in plain.items() if k not in ("command", "labels", "host_config")}


def test_a_copy_helper_is_labelled_with_its_workspace_and_role_only() -> None:
    from server.runtime.docker_specs import copy_helper_labels

    labels = {**labels_for(instance="i1", workspace_id="ws1", owner="7"), "den.snapshot": "sn1"}
    assert copy_helper_labels(labels, workspace_id="ws2") == {
        "den.managed": "true", "den.instance": "i1", "den.workspace": "ws2", "den.role": "copy"}


def test_the_checkpoint_command_marks_completion_only_after_runsc_succeeds(
        tmp_path: Path) -> None:
    import subprocess

    from server.runtime.docker_specs import checkpoint_argv, checkpoint_marker

    image = tmp_path / "den-checkpoints" / "den-pause"
    argv = checkpoint_argv(["runsc", "--root", "/r"], image=image, cid="c1")
    assert argv[4:] == ["runsc", "--root", "/r", "checkpoint", "--compression=none",
                        "--image-path", str(image), "c1"]
    assert checkpoint_marker(image) == image.with_name("den-pause.complete")
    image.parent.mkdir(parents=True)
    # The same shell with a runsc that fails, then one that succeeds.
    for runsc, marked in (["false"], False), (["true"], True):
        subprocess.run(checkpoint_argv(runsc, image=image, cid="c1")[:4] + runsc, check=False)
        assert checkpoint_marker(image).exists() is marked


def test_a_failed_checkpoint_says_its_cause_without_the_stack_trace() -> None:
    """As runsc 20240729 printed it when a TCP connection was open (before
    --net-disconnect-ok): the cause, then a Go stack trace of the sandbox."""
    output = (
        "checkpoint failed: checkpointing container \"4bd9\": encoding error: save rejected "
        "due to unsupported networking state: endpoint cannot be saved in connected state: "
        "local 172.17.0.2:62920, remote 172.17.0.1:8125\n"
        "goroutine 16 [running]:\ngvisor.dev/gvisor/pkg/state.safely.func1()\n"
        "\tgvisor.dev/gvisor/pkg/urpc/urpc.go:451 +0x6b\n")
    assert runsc_failure(output) == (
        "save rejected due to unsupported networking state: endpoint cannot be saved in "
        "connected state: local 172.17.0.2:62920, remote 172.17.0.1:8125")
    assert runsc_failure("checkpoint failed: no space left on device\n") == (
        "checkpoint failed: no space left on device")
    assert runsc_failure("something else\nlast words\n") == "last words"
    assert runsc_failure("") == ""


@pytest.mark.parametrize("armed", [False, True])
def test_the_rename_script_rewrites_the_old_names_line_only(tmp_path: Path, armed: bool) -> None:
    """Run by the host's /bin/sh (POSIX shell builtins only, as in any image), with the
    files under a directory of the test's and a ``hostname`` that records its argument."""
    etc = tmp_path / "etc"
    etc.mkdir()
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "hostname").write_text(f'#!/bin/sh\necho "$1" > {tmp_path}/kernel\n')
    (bin_ / "hostname").chmod(0o755)
    (etc / "hostname").write_text("ws-old\n")
    hosts = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
             "# a comment with a \\ backslash and ws-old inside\n"
             "10.88.0.5 ws-old\n10.88.0.6\tws-older\n  10.88.0.7\tfoo ws-old")
    (etc / "hosts").write_text(hosts)
    script = docker_specs.rename_script(str(etc))
    if armed:
        script = docker_specs.armed_hostname_argv(was="ws-old")[2].replace(
            docker_specs.rename_script(), script)
        argv = ["/bin/sh", "-c", script, "den-hostname", "ws-old"]
        out = subprocess.run(argv, input="api\n", capture_output=True, text=True,
                             env={"PATH": f"{bin_}:/usr/bin:/bin"})
        assert out.stdout.split() == [docker_specs.ARMED_READY, docker_specs.ARMED_DONE]
    else:
        argv = ["/bin/sh", "-c", script, "den-hostname", "api", "ws-old"]
        out = subprocess.run(argv, capture_output=True, text=True,
                             env={"PATH": f"{bin_}:/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "kernel").read_text() == "api\n"
    assert (etc / "hostname").read_text() == "api\n"
    assert (etc / "hosts").read_text() == (
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
        "# a comment with a \\ backslash and ws-old inside\n"
        "10.88.0.5 api\n10.88.0.6\tws-older\n  10.88.0.7\tfoo api\n")


@pytest.mark.parametrize("failing", ["hostname", "files"])
def test_the_armed_rename_says_nothing_done_when_a_step_fails(tmp_path: Path,
                                                             failing: str) -> None:
    # a fake ``hostname`` first on PATH: the host's own must never run here
    (tmp_path / "hostname").write_text(f"#!/bin/sh\nexit {int(failing == 'hostname')}\n")
    (tmp_path / "hostname").chmod(0o755)
    argv = docker_specs.armed_hostname_argv(was="ws-old")
    argv[2] = argv[2].replace(docker_specs.rename_script(),
                              docker_specs.rename_script(str(tmp_path / "missing")))
    out = subprocess.run(argv, input="api\n", capture_output=True, text=True,
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert out.returncode != 0
    assert docker_specs.ARMED_READY in out.stdout
    assert docker_specs.ARMED_DONE not in out.stdout
