"""A host name change made ready ahead of time (the warm pool's claim on the Docker backend).

Renaming a sandbox's host needs CAP_SYS_ADMIN: a privileged exec of Den's own script. Made
at claim time, that exec cost 0.3-0.7 s on the create's critical path under load (the
engine's exec create, runsc starting a process in the sandbox, the inspect), though it is
~0.1 s alone. So the pool starts it when it fills: the privileged root shell is started
before the sandbox is frozen and waits on its standard input for the name; a claim writes
the name and waits for the shell to say it renamed (tens of milliseconds: the process is
already there). The shell is Den's, started before anything of a user's ran, and has renamed
before the claim returns (it ends right after); nothing but Den (through the engine's attach
stream) can write to it.

Blocking: call from the runtime's executor threads.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from server.runtime import docker_specs
from server.runtime.errors import EngineError

READ_TIMEOUT_S = 30.0  # the shell's answer once it has the name
MAX_OUTPUT = 64 * 1024  # what the shell may print (an error): the rest is dropped


class ArmedRename:
    """A privileged shell in ``container`` blocked on reading the new host name (one line)."""

    def __init__(self, api: Any, container: str, *, was: str) -> None:
        self.container = container
        self._api = api
        created = api.exec_create(container, docker_specs.armed_hostname_argv(was=was),
                                  stdin=True, stdout=True, stderr=True, user="root",
                                  workdir="/", privileged=True)
        self._exec_id = str(created["Id"])
        self._sock = api.exec_start(self._exec_id, socket=True)
        self._raw: socket.socket = getattr(self._sock, "_sock", self._sock)
        try:
            self._ready()
        except BaseException:
            self.close()
            raise

    def _ready(self) -> None:
        """Wait until the shell runs (it says so): the engine answers the start before the
        process exists, and a sandbox frozen before then fails the exec ("cannot exec in a
        paused state")."""
        seen = bytearray()
        marker = docker_specs.ARMED_READY.encode()
        deadline = time.monotonic() + READ_TIMEOUT_S
        try:
            while marker not in seen:
                self._raw.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = self._raw.recv(4096)
                if not chunk or len(seen) > MAX_OUTPUT:
                    raise EngineError(f"could not arm the rename of {self.container}",
                                      detail=bytes(seen)[-500:].decode(errors="replace"))
                seen += chunk
        except OSError as exc:  # the timeout too
            raise EngineError(f"could not arm the rename of {self.container}",
                              detail=str(exc)) from exc

    def fire(self, hostname: str) -> None:
        """Give the shell ``hostname`` and wait until it says it renamed (``ARMED_DONE``,
        printed only when every step succeeded: the claim need not wait for the engine to
        report the exec's end, tens of milliseconds more), or until it ends without saying
        so: EngineError. The caller validated the name (one line of a host name's
        characters)."""
        if "\n" in hostname:
            raise EngineError(f"invalid host name {hostname!r}")
        done = docker_specs.ARMED_DONE.encode()
        out = bytearray()
        try:
            self._raw.settimeout(READ_TIMEOUT_S)
            self._raw.sendall(hostname.encode() + b"\n")
            with contextlib.suppress(OSError):
                self._raw.shutdown(socket.SHUT_WR)
            while done not in out and (chunk := self._raw.recv(65536)):
                out += chunk[: max(0, MAX_OUTPUT - len(out))]
        except OSError as exc:
            raise EngineError(f"could not name the host of {self.container}",
                              detail=str(exc)) from exc
        finally:
            self.close()
        if done in out:
            return
        if (code := _exit_code(self._api, self._exec_id)) == 0:  # said so past MAX_OUTPUT
            return
        raise EngineError(f"could not name the host of {self.container}",
                          detail=f"exit {code}: {bytes(out)[-500:].decode(errors='replace')}")

    def close(self) -> None:
        """Drop the stream (the sandbox is going away, or the name was given)."""
        with contextlib.suppress(OSError):
            self._sock.close()


def _exit_code(api: Any, exec_id: str) -> int:
    """The ended exec's exit code (the engine may report it a moment after the stream ends)."""
    deadline = time.monotonic() + 5
    while True:
        info = api.exec_inspect(exec_id)
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        if time.monotonic() > deadline:
            return -1
        time.sleep(0.01)
