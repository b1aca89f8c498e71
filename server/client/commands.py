"""The client verbs of the ``den`` CLI, built on :class:`server.client.Den`.

``server/cli.py`` owns the top-level parser and calls :func:`add_client_commands`; each verb sets
``func`` to a callable ``(args) -> int`` returning the exit code: 0 success, 1 an error (printed
as ``den: <message>`` on stderr), 2 a usage error, or the remote exit code for ``den exec``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from .api import Den, DenAPIError, Snapshot, Workspace
from .config import ClientConfig, load_config, save_config
from .processes import Process

__all__ = ["ClientFactory", "add_client_commands", "render_ssh_config", "ssh_argv"]

ClientFactory = Callable[[ClientConfig], Den]
Handler = Callable[[argparse.Namespace, "_Context"], int]

NOT_LOGGED_IN = "not logged in; run: den login URL --token TOKEN"


class CLIError(Exception):
    """A failure to report as ``den: <message>`` with the given exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def _default_factory(config: ClientConfig) -> Den:
    return Den(config.url, config.token)


@dataclass(frozen=True)
class _Context:
    factory: ClientFactory

    def client(self) -> Den:
        try:
            config = load_config()
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
        if config is None:
            raise CLIError(NOT_LOGGED_IN)
        return self.factory(config)


def _bind(handler: Handler, ctx: _Context) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args, ctx)
        except CLIError as exc:
            print(f"den: {exc.message}", file=sys.stderr)
            return exc.exit_code
        except DenAPIError as exc:
            print(f"den: {exc.message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return run


def _emit(stream: TextIO, text: str) -> None:
    """Write remote output as UTF-8 bytes, bypassing the local locale's encoding."""
    if not text:
        return
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(text)
        return
    stream.flush()
    buffer.write(text.encode("utf-8", "surrogateescape"))
    buffer.flush()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    all_rows = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header) - 1)]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _when(value: Any) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(value)


def _utc(value: str) -> str:
    """An ISO 8601 timestamp as ``YYYY-MM-DD HH:MM:SS UTC`` (as is when unparseable)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _state(ws: Workspace) -> str:
    """The state, with a paused workspace's sleep tier: "paused (frozen)"."""
    sleep = ws.raw.get("sleep")
    return f"{ws.state} ({sleep})" if ws.state == "paused" and sleep else ws.state


def _status_line(ws: Workspace) -> str:
    return f"{ws.name} {_state(ws)}"


def _size(n: int) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``117.7 MiB``, ``2.0 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _default_snapshot_name() -> str:
    """A UTC timestamp such as ``20261129-1405``."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M")


# --- verbs ------------------------------------------------------------------------------------


def _login(args: argparse.Namespace, ctx: _Context) -> int:
    token = args.token
    if not token:
        if not sys.stdin.isatty():
            raise CLIError("--token is required when stdin is not a terminal", 2)
        token = getpass.getpass("API token: ").strip()
    config = ClientConfig(url=args.url.rstrip("/"), token=token)
    with ctx.factory(config) as den:
        user = den.me()
    save_config(config)
    print(f"Logged in to {config.url} as {user.get('name', '?')}")
    return 0


def _create(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        ws = den.create(
            args.url,
            name=args.name,
            branch=args.branch,
            image=args.image,
            runtime=args.runtime,
            cpus=args.cpus,
            memory_mb=args.memory_mb,
            disk_gb=args.disk_gb,
            gpus=args.gpus,
            gpu_model=args.gpu_model,
            network=args.network,
            allow=args.allow,
            devcontainer=not args.no_devcontainer,
            prebuild=not args.no_prebuild,
            wait=not args.no_wait,
            timeout_s=args.timeout,
        )
        print(_status_line(ws))
    return 0


def _ls(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        workspaces = den.workspaces()
    if args.json:
        print(json.dumps([ws.raw for ws in workspaces], indent=2))
        return 0
    rows = [
        [ws.name, _state(ws), ws.repo_url or "-", _when(ws.raw.get("created_at"))]
        for ws in workspaces
    ]
    print(_table(["NAME", "STATE", "REPO", "CREATED"], rows))
    return 0


def _gpus(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        info = den.gpus() if args.reclaim is None else None
        if args.reclaim is not None:
            gpu = den.reclaim_gpu(args.reclaim)
            print(f"{gpu['uuid']}: free (its workspace was stopped; its disk is kept)")
            return 0
    assert info is not None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if not info["total"]:
        print("this server has no GPUs")
        return 0
    if info.get("gpus") is not None:  # an admin: each GPU and its holder
        rows = [[str(g["index"] if g["index"] is not None else "-"), g["uuid"],
                 g["model"] or "(not in the inventory)",
                 f"{g['held_by']['owner']}/{g['held_by']['workspace']}" if g["held_by"]
                 else "free",
                 "-" if g["utilization_percent"] is None else f"{g['utilization_percent']}%"]
                for g in info["gpus"]]
        print(_table(["INDEX", "UUID", "MODEL", "HELD BY", "UTIL"], rows))
    else:
        rows = [[m["model"], str(m["free"]), str(m["total"])] for m in info["models"]]
        print(_table(["MODEL", "FREE", "TOTAL"], rows))
    print(f"{info['free']} of {info['total']} free; an idle GPU workspace is "
          f"{'stopped' if info['idle_action'] == 'stop' else 'paused'}")
    return 0


def _exec_argv(args: argparse.Namespace, verb: str = "exec") -> list[str]:
    """The remote argv; ``den exec NAME --cwd D -- CMD`` is accepted too (options after NAME;
    ``--timeout`` only for exec)."""
    cmd: list[str] = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    elif cmd and cmd[0].startswith("-") and "--" in cmd:
        split = cmd.index("--")
        late = argparse.ArgumentParser(prog=f"den {verb}", add_help=False)
        late.add_argument("--cwd")
        if verb == "exec":
            late.add_argument("--timeout", type=float)
        opts = late.parse_args(cmd[:split])
        args.cwd = opts.cwd if opts.cwd is not None else args.cwd
        if verb == "exec":
            args.timeout = opts.timeout if opts.timeout is not None else args.timeout
        cmd = cmd[split + 1 :]
    if not cmd:
        raise CLIError(f"{verb}: no command given; usage: den {verb} NAME -- CMD...", 2)
    return cmd


def _exec(args: argparse.Namespace, ctx: _Context) -> int:
    argv = _exec_argv(args)
    with ctx.client() as den:
        result = den.workspace(args.name).exec(argv, cwd=args.cwd, timeout_s=args.timeout)
    _emit(sys.stdout, result.stdout)
    _emit(sys.stderr, result.stderr)
    if result.timed_out:
        after = f" after {args.timeout:g}s" if args.timeout is not None else ""
        print(f"den: command timed out{after}", file=sys.stderr)
        return 124
    if result.exit_code < 0:  # killed by a signal, shell convention
        return min(128 - result.exit_code, 255)
    return min(result.exit_code, 255)


def _spawn(args: argparse.Namespace, ctx: _Context) -> int:
    argv = _exec_argv(args, "spawn")
    with ctx.client() as den:
        proc = den.workspace(args.name).processes.start(argv, cwd=args.cwd)
    print(proc.pid)
    return 0


def _process_state(proc: Process) -> str:
    if proc.running:
        return "running"
    if proc.signal:
        return f"killed ({proc.signal})"
    return f"exited ({proc.exit_code})" if proc.exit_code is not None else "exited"


def _ps(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        procs = den.workspace(args.name).processes.list()
    if args.json:
        print(json.dumps([p.raw for p in procs], indent=2))
        return 0
    rows = [[str(p.pid), _process_state(p), _when(p.started_at), " ".join(p.cmd)]
            for p in procs]
    print(_table(["PID", "STATE", "STARTED", "COMMAND"], rows))
    return 0


def _logs(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        procs = den.workspace(args.name).processes
        chunks = (procs.logs(args.pid, follow=True) if args.follow
                  else procs.read_logs(args.pid).chunks)
        for chunk in chunks:
            _emit(sys.stderr if chunk.stream == "stderr" else sys.stdout, chunk.data)
    return 0


def _signal_name(value: str) -> str:
    """``term``, ``SIGTERM`` and ``TERM`` all name SIGTERM."""
    return value.upper().removeprefix("SIG")


def _kill(args: argparse.Namespace, ctx: _Context) -> int:
    signal = _signal_name(args.signal)
    with ctx.client() as den:
        den.workspace(args.name).processes.kill(args.pid, signal)
    print(f"sent {signal} to process {args.pid}")
    return 0


def _lifecycle(action: str) -> Handler:
    def handler(args: argparse.Namespace, ctx: _Context) -> int:
        with ctx.client() as den:
            ws = den.workspace(args.name)
            getattr(ws, action)()
            print(_status_line(ws))
        return 0

    return handler


def _keepalive(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        ws = den.workspace(args.name).keepalive(args.ttl)
    until = ws.keepalive_until
    print(f"{ws.name} keepalive until {_utc(until)}" if until else f"{ws.name} keepalive ended")
    return 0


def _ports(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        ports = den.workspace(args.name).ports()
    if args.json:
        print(json.dumps(ports, indent=2))
        return 0
    listening = {True: "yes", False: "no", None: "-"}
    rows = [[str(p["port"]), listening[p["listening"]], p["share"], p["url"] or p["path_url"]]
            for p in ports]
    print(_table(["PORT", "LISTENING", "SHARE", "URL"], rows))
    return 0


def _share(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        ws = den.workspace(args.name)
        if args.link is not None:
            link = ws.share_link(args.port, ttl_s=args.link)
            print(link["url"] or link["path_url"])
            print(f"link {link['id']}, valid until {_utc(str(link['expires_at']))}; "
                  f"den share {args.name} {args.port} --revoke {link['id']} ends it",
                  file=sys.stderr)
            return 0
        if args.links:
            links = ws.share_links(args.port)
            rows = [[str(x["id"]), str(x["created_by"]), _utc(str(x["created_at"])),
                     _utc(str(x["expires_at"]))] for x in links]
            print(_table(["LINK", "MADE BY", "MADE", "EXPIRES"], rows))
            return 0
        if args.revoke is not None:
            ws.revoke_share_link(args.port, args.revoke)
            print(f"{ws.name} port {args.port}: share link {args.revoke} revoked")
            return 0
        port = ws.share_port(args.port, args.share or "private")
    print(f"{ws.name} port {port['port']}: {port['share']}  {port['url'] or port['path_url']}")
    return 0


def _net(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        ws = den.workspace(args.name)
        if args.mode is not None:
            ws.set_network(args.mode, args.allow or [])
        elif args.allow:
            raise CLIError("--allow goes with the mode allowlist", exit_code=2)
        else:
            ws.refresh()
    net = ws.network
    allow = net.get("allow") or []
    print(f"{ws.name} network {net.get('mode')}" + (f" allow {' '.join(allow)}" if allow else ""))
    return 0


def _confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in {"y", "yes"}


def _rm(args: argparse.Namespace, ctx: _Context) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            msg = f"refusing to delete {args.name} without --yes (stdin is not a terminal)"
            raise CLIError(msg)
        what = ", its disk and its snapshots" if args.snapshots else " and its disk"
        if not _confirm(f"Delete workspace {args.name}{what}?"):
            raise CLIError("aborted")
    with ctx.client() as den:
        ws = den.workspace(args.name)
        done = ws.delete(snapshots=args.snapshots)
    print(f"{ws.name} {'deleted' if done else 'deleting'}")
    return 0


def _events(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        events = den.workspace(args.name).events()
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    rows = []
    for ev in events:
        before, after = ev.get("from_state"), ev.get("to_state")
        change = f"{before or '-'} -> {after}" if after else "-"
        rows.append([
            _when(ev.get("at")), str(ev.get("kind", "")), change,
            str(ev.get("actor") or "-"), str(ev.get("message") or ""),
        ])
    print(_table(["AT", "KIND", "STATE", "ACTOR", "MESSAGE"], rows))
    return 0


def _snapshot(args: argparse.Namespace, ctx: _Context) -> int:
    name = args.snapshot_name or _default_snapshot_name()
    with ctx.client() as den:
        snap = den.workspace(args.name).snapshot(name, memory=args.memory)
    print(snap.id)
    return 0


def _snapshot_row(snap: Snapshot) -> list[str]:
    return [snap.id, snap.name, "yes" if snap.memory else "no", _size(snap.size_bytes),
            _when(snap.created_at)]


def _snapshots(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        snaps = den.workspace(args.name).snapshots()
    if args.json:
        print(json.dumps([snap.raw for snap in snaps], indent=2))
        return 0
    print(_table(["ID", "NAME", "MEMORY", "SIZE", "CREATED"], [_snapshot_row(s) for s in snaps]))
    return 0


def _fork(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        ws = den.fork(args.snapshot, name=args.name, wait=not args.no_wait,
                      timeout_s=args.timeout)
        print(_status_line(ws))
    return 0


def _restore(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        ws = den.restore_snapshot(args.snapshot)
    print(_status_line(ws))
    return 0


def _prebuild(args: argparse.Namespace, ctx: _Context) -> int:
    if (args.url is None) == (args.delete is None):
        raise CLIError("give a repository URL, or --delete ID", exit_code=2)
    with ctx.client() as den:
        if args.delete is not None:
            den.delete_prebuild(args.delete)
            print(f"{args.delete} deleted")
            return 0
        pb = den.prebuild(args.url, branch=args.branch, wait=not args.no_wait,
                          timeout_s=args.timeout)
    print(f"{pb.id} {pb.state}" + (f" ({pb.commit[:12]})" if pb.commit else ""))
    if pb.state == "failed":
        print(pb.reason, file=sys.stderr)
        return 1
    return 0


def _prebuilds(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        pbs = den.prebuilds()
    if args.json:
        print(json.dumps([pb.raw for pb in pbs], indent=2))
        return 0
    rows = [[pb.id, pb.repo, pb.branch or "(default)", pb.state, pb.commit[:12] or "-",
             _when(pb.created_at)] for pb in pbs]
    print(_table(["ID", "REPO", "BRANCH", "STATE", "COMMIT", "CREATED"], rows))
    return 0


def _rm_snapshot(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        den.delete_snapshot(args.snapshot)
    print(f"{args.snapshot} deleted")
    return 0


# --- ssh ------------------------------------------------------------------------------------

_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def ssh_host(endpoint: Mapping[str, Any], api_url: str) -> str:
    """The host to ssh to: the server's public host, or, when it listens on a wildcard
    address, the host the API was reached by."""
    host = str(endpoint.get("host") or "")
    if host in _WILDCARDS:
        host = urlsplit(api_url).hostname or "127.0.0.1"
    return host


def ssh_argv(ws: Mapping[str, Any], api_url: str, command: Sequence[str], *,
             identity: str | None = None) -> list[str]:
    """The OpenSSH command line that ``den ssh`` runs for workspace ``ws`` (its JSON)."""
    endpoint = ws.get("ssh")
    if not isinstance(endpoint, Mapping):
        raise CLIError("the server's SSH gateway is off (DEN_SSH_PORT is 0)")
    argv = ["ssh", "-p", str(endpoint["port"])]
    if identity:
        argv += ["-i", identity]
    return [*argv, "--", f"{endpoint['user']}@{ssh_host(endpoint, api_url)}", *command]


def render_ssh_config(workspaces: Sequence[Mapping[str, Any]], *, api_host: str,
                      identity: str | None = None) -> str:
    """``Host den-<name>`` entries for ``~/.ssh/config``: what editors' Remote-SSH needs."""
    lines = ["# Den workspaces, written by `den ssh-config`; run it again after creating one."]
    for ws in workspaces:
        endpoint = ws.get("ssh")
        if not isinstance(endpoint, Mapping):
            lines.append(f"# {ws.get('name')}: the server's SSH gateway is off")
            continue
        host = str(endpoint.get("host") or "")
        lines += ["", f"Host den-{ws['name']}",
                  f"  HostName {api_host if host in _WILDCARDS else host}",
                  f"  Port {endpoint['port']}", f"  User {endpoint['user']}"]
        if identity:
            lines.append(f"  IdentityFile {identity}")
    return "\n".join(lines) + "\n"


def _ssh(args: argparse.Namespace, ctx: _Context) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    with ctx.client() as den:
        ws = den.workspace(args.name)
        argv = ssh_argv(ws.raw, den.url, command, identity=args.identity)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise CLIError(f"cannot run ssh: {exc}") from exc
    return 0  # not reached


def _ssh_config(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        workspaces = [ws.raw for ws in den.workspaces()]
        api_host = urlsplit(den.url).hostname or "127.0.0.1"
    sys.stdout.write(render_ssh_config(workspaces, api_host=api_host, identity=args.identity))
    return 0


def sign_challenge(challenge: str, key_file: str) -> str:
    """``challenge`` signed with ``ssh-keygen -Y sign -n den-ssh-key -f key_file`` (a private
    key, or a public key whose private half is in ssh-agent); the SSH SIGNATURE block."""
    try:
        proc = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "den-ssh-key", "-f", key_file],
                              input=challenge.encode(), stdout=subprocess.PIPE, check=False)
    except OSError as exc:
        raise CLIError(f"cannot run ssh-keygen to sign the challenge: {exc}") from exc
    if proc.returncode != 0:
        raise CLIError(f"ssh-keygen could not sign with {key_file} (exit {proc.returncode}); "
                       "give the private key with --key, or add it to ssh-agent")
    return proc.stdout.decode()


def _ssh_key_add(args: argparse.Namespace, ctx: _Context) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {args.file}: {exc}") from exc
    with ctx.client() as den, tempfile.TemporaryDirectory(prefix="den-key-") as tmp:
        signer = args.key
        if signer is None and args.file != "-" and args.file.endswith(".pub") \
                and Path(args.file[:-4]).exists():
            signer = args.file[:-4]  # the private key next to it
        if signer is None:  # the public key: ssh-keygen asks ssh-agent
            signer = str(Path(tmp) / "key.pub")
            Path(signer).write_text(text.strip() + "\n")
        challenge = den.ssh_key_challenge()
        signature = sign_challenge(challenge, signer)
        key = den.add_ssh_key(text, name=args.name, challenge=challenge, signature=signature)
    print(f"{key['id']} {key['fingerprint']} {key['name']}")
    return 0


def _ssh_key_ls(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        keys = den.ssh_keys()
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    rows = [[str(k["id"]), k["type"], k["fingerprint"], k["name"] or "-",
             _when(k.get("last_used_at")) if k.get("last_used_at") else "never",
             "verified" if k.get("verified") else "UNVERIFIED"] for k in keys]
    print(_table(["ID", "TYPE", "FINGERPRINT", "NAME", "LAST USED", "PROOF"], rows))
    if any(not k.get("verified") for k in keys):
        print("UNVERIFIED keys were added before Den asked for proof of possession; they "
              "still work. `den ssh-key add` them again to prove them.", file=sys.stderr)
    return 0


def _ssh_key_rm(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        den.delete_ssh_key(args.id)
    print(f"SSH key {args.id} removed")
    return 0


# --- registration -----------------------------------------------------------------------------


def _pr(args: argparse.Namespace, ctx: _Context) -> int:
    body = args.body or ""
    if args.body_file:
        try:
            body = (sys.stdin.read() if args.body_file == "-"
                    else Path(args.body_file).read_text())
        except OSError as exc:
            raise CLIError(f"cannot read {args.body_file}: {exc.strerror}") from exc
    with ctx.client() as den:
        pr = den.workspace(args.name).pull_request(
            args.title, body=body, branch=args.branch, base=args.base,
            commit_message=args.message, draft=args.draft)
    if args.json:
        print(json.dumps(pr.raw, indent=2))
        return 0
    verb = "opened" if pr.created else "updated"
    print(f"{verb} #{pr.number} {pr.branch} -> {pr.base} ({pr.push}): {pr.url}")
    return 0


def _forge_link(args: argparse.Namespace, ctx: _Context) -> int:
    token = args.token
    if args.token_stdin:
        token = sys.stdin.readline().strip()
    elif not token:
        if not sys.stdin.isatty():
            raise CLIError("--token or --token-stdin is required when stdin is not a "
                           "terminal", 2)
        token = getpass.getpass(f"{args.kind} token: ").strip()
    with ctx.client() as den:
        acct = den.link_forge(args.kind, args.base_url, token, api_url=args.api_url,
                              author_name=args.author_name or "",
                              author_email=args.author_email or "")
    print(f"linked {acct['kind']} account {acct['username']} at {acct['base_url']} "
          f"(id {acct['id']})")
    return 0


def _forge_ls(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        accounts = den.forges()
    if args.json:
        print(json.dumps(accounts, indent=2))
        return 0
    rows = [[str(a["id"]), a["kind"], a["username"], a["base_url"],
             f"{a['author_name']} <{a['author_email']}>"] for a in accounts]
    print(_table(["ID", "KIND", "USER", "BASE URL", "AUTHOR"], rows))
    return 0


def _forge_rm(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        den.unlink_forge(args.id)
    print(f"forge account {args.id} unlinked")
    return 0


def _quota_rows(quotas: Mapping[str, Any]) -> list[list[str]]:
    return [[name, f"{q['used']:g}", f"{q['limit']:g}",
             "" if q["limit"] == q["default"] else f"(server: {q['default']:g})"]
            for name, q in quotas.items()]


def _me(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        me = den.me()
    if args.json:
        print(json.dumps(me, indent=2))
        return 0
    print(f"{me['name']}{' (admin)' if me['is_admin'] else ''}")
    print(_table(["LIMIT", "USED", "OF", ""], _quota_rows(me["quotas"])))
    return 0


def _limits(args: argparse.Namespace, ctx: _Context) -> int:
    with ctx.client() as den:
        out = den.user_limits(args.user)
        if args.set:
            own: dict[str, float | None] = {
                name: q["limit"] for name, q in out["quotas"].items()
                if q["limit"] != q["default"]}
            for pair in args.set:
                name, sep, value = pair.partition("=")
                if not sep:
                    raise CLIError(f"{pair!r}: write NAME=VALUE (or NAME=default)", 2)
                try:
                    own[name] = None if value == "default" else (
                        float(value) if "." in value else int(value))
                except ValueError:
                    raise CLIError(f"{pair!r}: the value is not a number", 2) from None
            out = den.set_user_limits(args.user, own)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(_table(["LIMIT", "USED", "OF", ""], _quota_rows(out["quotas"])))
    return 0


def add_client_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    client_factory: ClientFactory | None = None,
) -> None:
    """Register login, create, ls, exec, spawn, ps, ports, share, logs, kill, start, stop,
    pause, resume, keepalive, net, rm, events, snapshot, snapshots, fork, restore, rm-snapshot,
    prebuild, prebuilds,
    pr, forge (link, ls, rm), ssh, ssh-config, ssh-key, me and limits.

    ``client_factory`` builds the :class:`Den` used by each verb (tests pass one that injects an
    ``httpx.MockTransport``); by default ``Den(config.url, config.token)``.
    """
    ctx = _Context(client_factory or _default_factory)

    def verb(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, help=help_text, description=help_text
        )
        parser.set_defaults(func=_bind(handler, ctx))
        return parser

    p = verb("login", _login, "check an API token against a Den server and save both")
    p.add_argument("url", metavar="URL", help="the server, e.g. https://den.example")
    p.add_argument("--token", help="API token (prompted for when omitted on a terminal)")

    p = verb("create", _create, "create a workspace from a Git repository")
    p.add_argument("url", metavar="URL", help="the repository to clone")
    p.add_argument("--name", help="workspace name (default: from the repo URL)")
    p.add_argument("--branch", help="branch to check out (default: the repo's default)")
    p.add_argument("--image", help="workspace image")
    p.add_argument("--runtime", help="gvisor (default), microvm or runc")
    p.add_argument("--cpus", type=float, help="CPU limit")
    p.add_argument("--memory-mb", type=int, help="memory limit in MiB")
    p.add_argument("--disk-gb", type=int, help="disk size in GiB")
    p.add_argument("--gpus", type=int, help="number of whole GPUs (held while it runs)")
    p.add_argument("--gpu-model", help='only GPUs whose model contains this, e.g. "A100"')
    p.add_argument("--network", choices=["none", "internet", "allowlist"],
                   help="network mode (default: the server's)")
    p.add_argument("--allow", action="append", metavar="ENTRY",
                   help="with --network allowlist: a CIDR, address or domain name, optionally "
                        "with :port (repeat)")
    p.add_argument("--no-devcontainer", action="store_true",
                   help="ignore the repository's devcontainer.json (default: build from it)")
    p.add_argument("--no-prebuild", action="store_true",
                   help="build from scratch even when you have a ready prebuild of the repo")
    p.add_argument("--no-wait", action="store_true", help="return while it is still creating")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")

    p = verb("gpus", _gpus, "the server's GPUs: free per model (admins: who holds each)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--reclaim", metavar="UUID",
                   help="(admin) free a GPU by stopping the workspace that holds it")

    p = verb("me", _me, "who you are, and your limits with what you use of each")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = verb("limits", _limits, "a user's limits (admins); NAME=VALUE sets the user's own "
                                "(NAME=default: the server's again)")
    p.add_argument("user", metavar="USER")
    p.add_argument("set", metavar="NAME=VALUE", nargs="*",
                   help="workspaces, cpus, memory_mb, disk_gb, snapshots, execs, streams, "
                        "terminals, ssh_channels")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = verb("ls", _ls, "list workspaces")
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    p = verb("exec", _exec, "run a command in a workspace: den exec NAME -- CMD...")
    p.add_argument("--cwd", help="working directory inside the workspace")
    p.add_argument("--timeout", type=float, help="kill the command after this many seconds")
    p.add_argument("name", metavar="NAME")
    p.add_argument("cmd", metavar="CMD", nargs=argparse.REMAINDER, help="the command and args")

    p = verb("spawn", _spawn, "start a background process in a workspace (it survives pause); "
                              "prints its pid: den spawn NAME -- CMD...")
    p.add_argument("--cwd", help="working directory inside the workspace")
    p.add_argument("name", metavar="NAME")
    p.add_argument("cmd", metavar="CMD", nargs=argparse.REMAINDER, help="the command and args")

    p = verb("ps", _ps, "list a workspace's background processes")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    p = verb("ports", _ports, "list a workspace's listening ports with their preview URLs")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    p = verb("share", _share, "set who may open a port's preview URL, or make a share link")
    p.add_argument("name", metavar="NAME")
    p.add_argument("port", metavar="PORT", type=int)
    level = p.add_mutually_exclusive_group(required=True)
    level.add_argument("--public", dest="share", action="store_const", const="public",
                       help="anyone with the URL (when the server allows it)")
    level.add_argument("--users", dest="share", action="store_const", const="users",
                       help="anyone signed in to this Den")
    level.add_argument("--private", dest="share", action="store_const", const="private",
                       help="only you (the default)")
    level.add_argument("--link", type=int, metavar="SECONDS",
                       help="print a signed link that works without signing in for SECONDS")
    level.add_argument("--links", action="store_true",
                       help="list the port's live share links")
    level.add_argument("--revoke", metavar="LINK",
                       help="end a share link (its id, from --links) before it expires")

    p = verb("logs", _logs, "print a background process's output (what the workspace kept)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("pid", metavar="PID", type=int)
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new output until the process exits")

    p = verb("kill", _kill, "send a signal to a background process's group")
    p.add_argument("name", metavar="NAME")
    p.add_argument("pid", metavar="PID", type=int)
    p.add_argument("-s", "--signal", default="TERM",
                   help="INT, TERM (default), KILL, HUP, QUIT, USR1, USR2, WINCH, STOP or CONT")

    for action, help_text in (
        ("start", "start a stopped workspace (a paused one is resumed)"),
        ("stop", "stop a workspace (processes end, the disk stays)"),
        ("pause", "pause a workspace: save its memory and processes, free CPU and RAM"),
        ("resume", "resume a paused workspace from its memory checkpoint"),
    ):
        p = verb(action, _lifecycle(action), help_text)
        p.add_argument("name", metavar="NAME")

    p = verb("keepalive", _keepalive,
             "keep a workspace awake (not paused when idle) for a while; wakes it if needed")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--ttl", type=int, default=900, metavar="S",
                   help="seconds the lease lasts (default 900); 0 ends the lease")

    p = verb("net", _net, "show or change a workspace's network policy (applies at once)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("mode", nargs="?", choices=["none", "internet", "allowlist"],
                   help="the new mode; without it, show the policy")
    p.add_argument("--allow", action="append", metavar="ENTRY",
                   help="with allowlist: a CIDR, address or domain name, optionally with :port "
                        "(repeat)")

    p = verb("rm", _rm, "delete a workspace and its disk")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--snapshots", action="store_true",
                   help="delete the workspace's snapshots too (kept by default)")

    p = verb("events", _events, "show a workspace's event log")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    p = verb("snapshot", _snapshot,
             "snapshot a workspace's disk (and memory with --memory); prints the snapshot id")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--name", dest="snapshot_name", metavar="SNAP",
                   help="the snapshot's name (default: the UTC time, e.g. 20261129-1405)")
    p.add_argument("--memory", action="store_true",
                   help="save memory and processes too (pauses the workspace for the moment)")

    p = verb("snapshots", _snapshots, "list a workspace's snapshots")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    p = verb("fork", _fork, "create a new workspace from a snapshot")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot id")
    p.add_argument("--name", required=True, help="the new workspace's name")
    p.add_argument("--no-wait", action="store_true", help="return while it is still creating")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")

    p = verb("restore", _restore,
             "roll a snapshot's workspace back to it (stop, replace its files, start)")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot id")

    p = verb("rm-snapshot", _rm_snapshot, "delete a snapshot (forks made from it stay)")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot id")

    p = verb("prebuild", _prebuild,
             "prebuild a repository's branch (clone, build, create commands, memory snapshot) "
             "so that new workspaces of it fork from it; or delete one with --delete")
    p.add_argument("url", metavar="URL", nargs="?", help="the repository")
    p.add_argument("--branch", help="branch (default: the repo's default)")
    p.add_argument("--delete", metavar="ID", help="delete this prebuild and its snapshot")
    p.add_argument("--no-wait", action="store_true", help="return while it is still building")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait (default 1800)")

    p = verb("prebuilds", _prebuilds, "list your prebuilds")
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    p = verb("pr", _pr, "commit, push and open a pull request from a workspace (the forge "
                        "token stays on the server)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--title", required=True, help="the pull request's title")
    p.add_argument("--body", help="its description")
    p.add_argument("--body-file", metavar="FILE", help="read the description from FILE (- stdin)")
    p.add_argument("--branch", help="the branch to push (default den/NAME)")
    p.add_argument("--base", help="the branch to merge into (default the workspace's branch)")
    p.add_argument("-m", "--message", help="commit message for uncommitted changes "
                                           "(default the title)")
    p.add_argument("--draft", action="store_true", help="open it as a draft")
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    forge = subparsers.add_parser("forge", help="link GitHub, GitLab or Gitea accounts",
                                  description="link GitHub, GitLab or Gitea accounts")
    forge_sub = forge.add_subparsers(dest="forge_command", required=True, metavar="ACTION")
    p = forge_sub.add_parser("link", help="link an account (the token is stored encrypted)")
    p.set_defaults(func=_bind(_forge_link, ctx))
    p.add_argument("kind", choices=["github", "gitlab", "gitea"],
                   help="the forge's kind (gitea also covers Forgejo)")
    p.add_argument("base_url", metavar="BASE_URL",
                   help="the forge's web address, e.g. https://github.com")
    p.add_argument("--token", help="personal access token (prompted for on a terminal)")
    p.add_argument("--token-stdin", action="store_true", help="read the token from stdin")
    p.add_argument("--api-url", help="REST root, when it is not the usual one")
    p.add_argument("--author-name", help="commit author name (default from the forge)")
    p.add_argument("--author-email", help="commit author email (default from the forge)")
    p = forge_sub.add_parser("ls", help="list linked accounts")
    p.set_defaults(func=_bind(_forge_ls, ctx))
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p = forge_sub.add_parser("rm", help="unlink an account and forget its token")
    p.set_defaults(func=_bind(_forge_rm, ctx))
    p.add_argument("id", metavar="ID", help="the account id (den forge ls)")

    p = verb("ssh", _ssh, "a shell in a workspace over SSH, or run CMD: den ssh NAME [-- CMD]")
    p.add_argument("-i", "--identity", metavar="FILE", help="the private key to use")
    p.add_argument("name", metavar="NAME")
    p.add_argument("cmd", metavar="CMD", nargs=argparse.REMAINDER, help="a command to run")

    p = verb("ssh-config", _ssh_config,
             "print Host entries (den-NAME) for ~/.ssh/config, for ssh and editors' Remote-SSH")
    p.add_argument("-i", "--identity", metavar="FILE", help="add IdentityFile FILE to each")

    keys = subparsers.add_parser("ssh-key", help="manage your SSH public keys",
                                 description="manage your SSH public keys")
    keys_sub = keys.add_subparsers(dest="ssh_key_command", required=True, metavar="ACTION")
    p = keys_sub.add_parser("add", help="register a public key (FILE, or - for stdin), "
                            "signing Den's challenge with it (ssh-keygen -Y sign)")
    p.set_defaults(func=_bind(_ssh_key_add, ctx))
    p.add_argument("file", metavar="FILE", help="e.g. ~/.ssh/id_ed25519.pub")
    p.add_argument("--key", metavar="PRIVATE", help="the private key that signs (default: "
                   "FILE without .pub, else ssh-agent)")
    p.add_argument("--name", help="a label (default: the key's comment)")
    p = keys_sub.add_parser("ls", help="list your SSH keys")
    p.set_defaults(func=_bind(_ssh_key_ls, ctx))
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p = keys_sub.add_parser("rm", help="remove an SSH key")
    p.set_defaults(func=_bind(_ssh_key_rm, ctx))
    p.add_argument("id", metavar="ID", help="the key's id (den ssh-key ls)")
