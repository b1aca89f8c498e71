"""Engine calls that outlive their caller.

A backend runs its blocking engine calls in threads, and a thread cannot be stopped: when the
task awaiting one is cancelled (a delete cancels the workspace's create or fork), the task
ends at once and the call runs on. A delete that went on from there met what the call was
still making (measured: a fork's copy helper held the new volume for 48 s, so the delete's
volume removal failed, the workspace went to ``error``, and its volume stayed behind) or saw
objects made after it had removed everything.

So a piece of work that may be cancelled runs in a context with a :class:`Calls` of its own
(:func:`tracking`), and every backend starts its threads through :func:`run`: a call whose
caller is cancelled while it runs is kept in that :class:`Calls` until its thread ends, and
the canceller waits for :meth:`Calls.settled` before it touches the workspace's engine
objects. A call still queued when its caller is cancelled never runs, and long work checks
:func:`abandoned` between its steps (a copy helper not started, a clone's git killed), so
that the wait is short. Outside such a context :func:`run` is a plain ``run_in_executor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_CURRENT: contextvars.ContextVar[Calls | None] = contextvars.ContextVar("den_engine_calls",
                                                                       default=None)
_thread = threading.local()  # .call: the tracked call this thread runs


class Calls:
    """The calls of one piece of work that its cancelled caller left running in threads."""

    def __init__(self) -> None:
        self._running: set[_Call[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        """How many abandoned calls still run."""
        return len(self._running)

    def _abandoned(self, call: _Call[Any]) -> None:
        self._running.add(call)
        self._idle.clear()

    def _ended(self, call: _Call[Any]) -> None:
        self._running.discard(call)
        if not self._running:
            self._idle.set()

    async def settled(self, timeout_s: float) -> bool:
        """Whether every abandoned call has ended, waiting at most ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        return self._idle.is_set()


def tracking(calls: Calls) -> contextvars.Context:
    """A context for a task (``asyncio.create_task(..., context=...)``) whose engine calls
    are tracked in ``calls``; tasks it starts inherit it."""
    context = contextvars.copy_context()
    context.run(_CURRENT.set, calls)
    return context


class _Call(Generic[T]):
    """One call on its way to a thread: it runs unless its caller gave it up first."""

    def __init__(self, fn: Callable[[], T], calls: Calls, loop: asyncio.AbstractEventLoop
                 ) -> None:
        self._fn = fn
        self._calls = calls
        self._loop = loop
        self._lock = threading.Lock()
        self._state = "queued"  # -> running [-> abandoned] -> done; or -> dropped (never runs)

    def __call__(self) -> T:  # in the thread
        with self._lock:
            if self._state == "dropped":  # nobody reads what a dropped call returns
                raise asyncio.CancelledError
            self._state = "running"
        _thread.call = self
        try:
            return self._fn()
        finally:
            _thread.call = None
            with self._lock:
                abandoned = self._state == "abandoned"
                self._state = "done"
            if abandoned:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(self._calls._ended, self)

    def abandon(self) -> None:
        """Its caller was cancelled (on the loop): a queued call is dropped, a running one
        is kept in its :class:`Calls` until it ends."""
        with self._lock:
            if self._state == "queued":
                self._state = "dropped"
            elif self._state == "running":
                self._state = "abandoned"
                self._calls._abandoned(self)


def abandoned() -> bool:
    """In a thread: whether the caller of the tracked call it runs was cancelled (its
    workspace is being deleted). Long work checks it before each step and stops early."""
    call = getattr(_thread, "call", None)
    return call is not None and call._state == "abandoned"


async def to_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """:func:`asyncio.to_thread`, tracked: ``fn`` runs in a copy of the current context."""
    context = contextvars.copy_context()
    return await run(None, functools.partial(context.run, fn, *args, **kwargs))


async def run(executor: Executor | None, fn: Callable[[], T]) -> T:
    """``fn()`` on ``executor`` (None: the loop's default), tracked when the current context
    has a :class:`Calls` (:func:`tracking`)."""
    loop = asyncio.get_running_loop()
    calls = _CURRENT.get()
    if calls is None:
        return await loop.run_in_executor(executor, fn)
    call = _Call(fn, calls, loop)
    try:
        return await loop.run_in_executor(executor, call)
    except asyncio.CancelledError:
        call.abandon()
        raise
