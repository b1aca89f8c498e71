"""The warm pool itself: makes sandboxes in the background, hands them to creates.

Each pooled sandbox is a workspace's container and volume made ahead of its row: its id is
minted here and is the id the claiming workspace takes (labels are immutable), so once the
row exists reconcile matches the objects to it like any other workspace's. Until then the
pool owns them: reconcile skips what :meth:`WarmPool.owned` lists. A sandbox is frozen (the
cgroup freezer: an idle one costs ~1% of this 2-core machine on runsc's systrap, a frozen one
none) as soon as it has booted and Den's agent answered; a claim thaws it (milliseconds).

After a restart, the pool's sandboxes from the previous run are removed by reconcile as
orphans (they have no row and this process does not own them) and the pool makes new ones:
nothing can be said for sure about a sandbox while Den was not watching it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from server.config import Settings
from server.errors import DenError
from server.metrics import Metrics
from server.pool import fit
from server.pool.fit import PoolKey
from server.runtime.base import (
    LABEL_ROLE,
    ROLE_POOL,
    AgentChannel,
    ArmedRehost,
    Freezer,
    Rehost,
    Runtime,
    WorkspaceSpec,
    labels_for,
)
from server.workspaces import naming
from server.workspaces.sleep import host_available_bytes

log = logging.getLogger(__name__)

TICK_S = 5.0  # how often an idle pool looks at the host's memory (and retries a failure)
REFILL_AFTER_S = 0.5  # a replacement is made this long after the last claim ended (the
# claimant's first exec comes right after its create), not beside a claim: on a small host
# the boot's CPU (the engine, runsc) slowed the claim it replaces (measured: docs/benchmarks.md)
CLAIM_HOLDS_S = 30.0  # ... or once a claim has run this long (a create stuck in its clone)
SETTLE_S = 20.0  # how long a new sandbox may stay busy before it is frozen anyway: what its boot
# started (den-init's sudo broker and tmux with a login shell) runs before the freeze, not in
# the claim (measured: ~0.9 s of CPU after the thaw otherwise; server/runtime/cgroup_cpu.py)
CLAIMED_KEPT_S = 600.0  # how long a claimed id stays owned: its row may be newer than a
# reconcile's list of rows, which then must not take its objects for orphans


@dataclass(frozen=True)
class Pooled:
    """A frozen sandbox waiting in the pool."""

    workspace_id: str
    key: PoolKey
    spec: WorkspaceSpec
    memory_bytes: int  # held while frozen, as measured by the freeze
    made_at: float  # monotonic


class WarmPool:
    """Keeps ``settings.pool_size`` frozen sandboxes of each pool image, within
    ``settings.pool_memory_budget_mb``; creates take them with :meth:`take`."""

    def __init__(self, *, settings: Settings, runtime: Runtime, instance_id: str,
                 metrics: Metrics | None = None,
                 available_bytes: Callable[[], int | None] = host_available_bytes,
                 refill_after_s: float = REFILL_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.refill_after_s = refill_after_s
        self._clock = clock
        self.runtime = runtime
        self.instance_id = instance_id
        self._available = available_bytes
        usable = isinstance(runtime, Freezer) and isinstance(runtime, Rehost)
        images = settings.pool_images or [settings.default_image]
        self.keys = [self.key_of(image) for image in dict.fromkeys(images)] \
            if settings.pool_size > 0 and usable else []
        self._idle: dict[PoolKey, list[Pooled]] = {k: [] for k in self.keys}
        self._making: set[str] = set()
        self._claimed: dict[str, float] = {}  # id -> when it was taken
        self._open: dict[str, float] = {}  # claims not ended yet: id -> when taken (clock)
        self._last_ended = float("-inf")  # when the last claim ended (clock)
        self._measured: list[int] = []  # what the last sandboxes held (bounded)
        self._full = False  # the budget had no room for another (logged once)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        registry = metrics.registry if metrics is not None else None
        self._gauge = Gauge("den_pool_sandboxes", "Frozen sandboxes waiting in the warm pool, "
                            "by image.", ["image"], registry=registry)
        self._claims = Counter("den_pool_claims", "Creates by what the warm pool did for them: "
                               "hit (served by a pooled sandbox), empty (none was waiting), "
                               "no_fit (the request fits no pooled sandbox).", ["result"],
                               registry=registry)
        self._held = Gauge("den_pool_memory_bytes", "Memory the warm pool's frozen sandboxes "
                           "hold together (as measured when each was frozen).",
                           registry=registry)
        for k in self.keys:
            self._gauge.labels(k.image).set(0)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def key_of(self, image: str) -> PoolKey:
        """The shape of this server's pooled sandboxes of ``image``: the default resources."""
        st = self.settings
        return PoolKey(image=image, runtime="gvisor", cpus=st.default_cpus,
                       memory_mb=st.default_memory_mb, disk_gb=st.default_disk_gb,
                       pids_limit=st.default_pids)

    # --- what creates call --------------------------------------------------------------

    def take(self, key: PoolKey | None) -> Pooled | None:
        """The oldest sandbox of ``key`` (no longer the pool's to give), or None."""
        if not self.enabled:
            return None
        waiting = self._idle.get(key) if key is not None else None
        if not waiting:
            self._claims.labels("empty" if waiting is not None else "no_fit").inc()
            return None
        pooled = waiting.pop(0)
        self._claims.labels("hit").inc()
        self._claimed[pooled.workspace_id] = time.monotonic()
        self._open[pooled.workspace_id] = self._clock()
        self._changed(pooled.key)
        return pooled

    def give_back(self, pooled: Pooled) -> None:
        """A taken sandbox that was not used (the create was refused before its row): it
        never ran anything of anyone's, so it waits again."""
        self._claimed.pop(pooled.workspace_id, None)
        self._open.pop(pooled.workspace_id, None)
        self._idle.setdefault(pooled.key, []).insert(0, pooled)
        self._changed(pooled.key)

    def ended(self, pooled: Pooled) -> None:
        """The create that took ``pooled`` has ended, either way: the pool may refill once
        :meth:`refill_wait` says so. Idempotent."""
        if self._open.pop(pooled.workspace_id, None) is not None:
            self._last_ended = self._clock()
            if self._wake is not None:
                self._wake.set()

    def refill_wait(self) -> float:
        """Seconds before the pool may boot a replacement: not while a claim runs (up to
        ``CLAIM_HOLDS_S`` each), and ``refill_after_s`` after the last one ended. 0: now."""
        now = self._clock()
        holding = [CLAIM_HOLDS_S - (now - at) for at in self._open.values()]
        return max([*holding, self.refill_after_s - (now - self._last_ended), 0.0])

    async def claim(self, pooled: Pooled, *, hostname: str) -> str | None:
        """Make a taken sandbox the workspace's: thaw it and give it ``hostname``. None when
        done; else why not (the sandbox is then removed, and the create makes a fresh one
        under the same names)."""
        return await self.thaw(pooled) or await self.name(pooled, hostname=hostname)

    async def thaw(self, pooled: Pooled) -> str | None:
        """:meth:`claim`'s first half: the sandbox runs again (nothing in it but Den's)."""
        return await self._claiming(pooled, self._thaw(pooled))

    async def name(self, pooled: Pooled, *, hostname: str) -> str | None:
        """:meth:`claim`'s second half, once thawed: ``hostname`` becomes its host name (the
        rename the pool armed when it made the sandbox, where the backend can)."""
        assert isinstance(self.runtime, Rehost)
        return await self._claiming(pooled, self.runtime.set_hostname(
            pooled.spec, hostname, was=pooled.spec.hostname))

    async def _thaw(self, pooled: Pooled) -> None:
        assert isinstance(self.runtime, Freezer)
        await self.runtime.thaw(pooled.spec)

    async def _claiming(self, pooled: Pooled, step: Awaitable[None]) -> str | None:
        try:
            await step
        except DenError as exc:
            log.warning("workspace %s: the pooled sandbox could not be claimed: %s %s",
                        pooled.workspace_id, exc.message, exc.detail)
            await self.discard(pooled)
            return exc.message
        return None

    async def discard(self, pooled: Pooled) -> None:
        """Remove a taken sandbox (it does not fit after all: a devcontainer.json)."""
        with contextlib.suppress(DenError):
            await self.runtime.destroy(pooled.spec)

    def owned(self) -> set[str]:
        """Ids whose engine objects are the pool's (waiting, being made, or taken lately):
        reconcile must not remove them as orphans."""
        now = time.monotonic()
        for ws_id in [i for i, at in self._claimed.items() if now - at > CLAIMED_KEPT_S]:
            del self._claimed[ws_id]
        waiting = {p.workspace_id for ps in self._idle.values() for p in ps}
        return waiting | self._making | set(self._claimed)

    def size(self, image: str | None = None) -> int:
        return sum(len(ps) for k, ps in self._idle.items() if image in (None, k.image))

    def held_bytes(self) -> int:
        return sum(p.memory_bytes for ps in self._idle.values() for p in ps)

    # --- the background loop ----------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="warm-pool")

    async def stop(self) -> None:
        """Stop filling; the waiting sandboxes stay (reconcile removes them at the next
        start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                acted = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the pool must outlive a bad step; the next tick retries
                log.exception("warm pool: step failed")
                acted = False
            if not acted:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(),
                                           min(TICK_S, self.refill_wait() or TICK_S))

    async def step(self) -> bool:
        """One change towards the pool's target: give back the newest sandbox when the host
        is short of memory, else make one where a pool image lacks one and the budget has
        room. Whether it changed anything."""
        floor = self.settings.host_min_available_mb * fit.MIB
        if fit.short_of_memory(available_bytes=self._available(), floor_bytes=floor):
            waiting = [p for ps in self._idle.values() for p in ps]
            if not waiting:
                return False
            newest = max(waiting, key=lambda p: p.made_at)
            self._idle[newest.key].remove(newest)
            self._changed(newest.key)
            log.info("warm pool: host short of memory; removing pooled sandbox %s",
                     newest.workspace_id)
            await self.discard(newest)
            return True
        budget = self.settings.pool_memory_budget_mb * fit.MIB
        for key in self.keys:
            if len(self._idle[key]) >= self.settings.pool_size:
                continue
            if self.refill_wait() > 0:  # a claim is running: it gets the CPU first
                return False
            if not fit.room_for_one(held_bytes=self.held_bytes(), budget_bytes=budget,
                                    estimate=fit.estimate_bytes(self._measured)):
                if not self._full:  # once, until the pool changes
                    self._full = True
                    log.info("warm pool: %d sandboxes hold %d MiB; the budget of %d MiB has "
                             "no room for another", self.size(), self.held_bytes() // fit.MIB,
                             budget // fit.MIB)
                return False
            return await self._make(key)
        return False

    def spec_of(self, key: PoolKey, workspace_id: str) -> WorkspaceSpec:
        """A pooled sandbox's spec: the names a workspace of this id gets, no owner yet, and
        its id as host name until a claim renames it."""
        labels = {**labels_for(instance=self.instance_id, workspace_id=workspace_id,
                               owner=""), LABEL_ROLE: ROLE_POOL}
        return WorkspaceSpec(
            workspace_id=workspace_id,
            handle=self.runtime.new_handle(workspace_id),
            image=key.image, runtime=key.runtime, cpus=key.cpus, memory_mb=key.memory_mb,
            pids_limit=key.pids_limit, hostname=workspace_id, labels=labels,
            disk_gb=key.disk_gb)

    async def _make(self, key: PoolKey) -> bool:
        """Boot one sandbox, reach its agent (Den's own session, kept across the freeze: the
        first exec after a claim needs no relay), make its rename ready where the backend
        can (the claim then only gives the name), let what its boot started settle, freeze
        it and measure what it holds."""
        assert isinstance(self.runtime, Freezer)
        ws_id = naming.new_workspace_id()
        spec = self.spec_of(key, ws_id)
        self._making.add(ws_id)
        try:
            return await self._boot(key, spec)
        finally:  # waiting by now, or removed (or left to reconcile: a bug, a cancel)
            self._making.discard(ws_id)

    async def _boot(self, key: PoolKey, spec: WorkspaceSpec) -> bool:
        assert isinstance(self.runtime, Freezer)
        try:
            await self.runtime.create(spec)
            await self.runtime.start(spec)
            if isinstance(self.runtime, AgentChannel):
                await self.runtime.agent(spec)
            await self._arm(spec)
            if not await self.runtime.settle(spec, timeout_s=SETTLE_S):
                log.info("warm pool: sandbox %s still busy after %g s (or not measurable); "
                         "frozen as it is", spec.workspace_id, SETTLE_S)
            memory = await self.runtime.freeze(spec) or fit.FIRST_ESTIMATE_BYTES
        except DenError as exc:
            log.warning("warm pool: could not make a sandbox of %s: %s %s", key.image,
                        exc.message, exc.detail)
            with contextlib.suppress(DenError):
                await self.runtime.destroy(spec)
            return False
        self._measured = [*self._measured[-9:], memory]
        pooled = Pooled(spec.workspace_id, key, spec, memory, time.monotonic())
        budget = self.settings.pool_memory_budget_mb * fit.MIB
        if fit.over_budget(held_bytes=self.held_bytes() + memory, budget_bytes=budget):
            log.info("warm pool: a sandbox of %s holds %d MiB, past the budget; removed",
                     key.image, memory // fit.MIB)
            await self.discard(pooled)
            return False
        self._idle[key].append(pooled)
        self._changed(key)
        log.info("warm pool: sandbox %s of %s ready (%d MiB frozen)", spec.workspace_id,
                 key.image, memory // fit.MIB)
        return True

    async def _arm(self, spec: WorkspaceSpec) -> None:
        """Make the claim's rename ready where the backend can; where that fails, the
        claim renames the ordinary way (slower), so the sandbox still serves."""
        if not isinstance(self.runtime, ArmedRehost):
            return
        try:
            await self.runtime.arm_hostname(spec)
        except DenError as exc:
            log.warning("warm pool: the rename of %s could not be made ready (%s %s); a "
                        "claim renames it the ordinary way", spec.workspace_id, exc.message,
                        exc.detail)

    def _changed(self, key: PoolKey) -> None:
        self._full = False
        self._gauge.labels(key.image).set(len(self._idle.get(key, [])))
        self._held.set(self.held_bytes())
        if self._wake is not None:
            self._wake.set()
