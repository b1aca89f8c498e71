"""``den serve`` (:func:`server.serve.serve`, the same code path) on the fake runtime, for tests
that need a server process without the engine: ``python -m tests.fake_serve --port N``,
settings from ``DEN_*`` as for ``den serve``.

The fake's exec of ``wedge`` blocks an engine thread for good, as a wedged engine exec did: the
request waits on it and cancelling the request does not end the thread. Once it has started,
the file named by ``DEN_TEST_WEDGE_MARKER`` exists.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from pathlib import Path

from server.config import Settings
from server.runtime.base import ExecRequest, ExecResult, WorkspaceSpec
from server.runtime.fake import FakeRuntime
from server.serve import serve


class WedgingRuntime(FakeRuntime):
    async def exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        if list(req.argv) == ["wedge"]:
            Path(os.environ["DEN_TEST_WEDGE_MARKER"]).touch()
            await asyncio.to_thread(threading.Event().wait)  # never returns
        return await super().exec(spec, req)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("serve", nargs="?")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    sys.exit(serve(Settings(port=args.port), runtime=WedgingRuntime()))


if __name__ == "__main__":
    main()
