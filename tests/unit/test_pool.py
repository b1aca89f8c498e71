"""The warm pool (server/pool/) on the fake runtime: it fills within its budget, a create that
fits claims a sandbox (renamed, thawed, seeded), one that does not fit takes the normal path,
it shrinks when the host runs short of memory, and reconcile leaves its sandboxes alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from server.errors import Conflict
from server.pool import fit, warm
from server.pool.fit import PoolKey
from server.pool.warm import WarmPool
from server.runtime.base import ContainerStatus
from server.runtime.docker_specs import container_of
from server.runtime.fake import FakeRuntime
from server.workspaces.service import WorkspaceService
from tests.conftest import FakeClock
from tests.unit.test_service_fake import create, user

pytestmark = pytest.mark.anyio
MIB = 1024 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pooled_service(make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
                   *, available: list[int | None] | None = None,
                   clock: FakeClock | None = None, **settings: object
                   ) -> tuple[WorkspaceService, WarmPool]:
    """A service with a warm pool; without ``clock``, the pool refills as soon as a claim
    ended (the deferral has a test of its own)."""
    st = {"pool_size": 2, "pool_memory_budget_mb": 1024, **settings}
    probe = make_service(**st)
    avail = available if available is not None else [None]
    pool = WarmPool(settings=probe.settings, runtime=fake_runtime, instance_id="inst-test",
                    available_bytes=lambda: avail[0],
                    **({"clock": clock} if clock is not None else {"refill_after_s": 0.0}))
    svc = make_service(service_kw={"pool": pool}, engine_prefix=probe.settings.engine_prefix,
                       **st)
    return svc, pool


async def fill(pool: WarmPool) -> None:
    while await pool.step():
        pass


def test_request_key_refuses_what_a_claim_cannot_change() -> None:
    base = {"image": "den/workspace:latest", "runtime": "gvisor", "cpus": 1.0,
            "memory_mb": 512, "disk_gb": 10, "pids_limit": 64}
    key = fit.request_key(**base, gpus=0, env={})  # type: ignore[arg-type]
    assert key == PoolKey(**base)  # type: ignore[arg-type]
    assert fit.request_key(**base, gpus=1, env={}) is None  # type: ignore[arg-type]
    assert fit.request_key(**base, gpus=0, env={"A": "1"}) is None  # type: ignore[arg-type]
    assert fit.request_key(**{**base, "runtime": "runc"}, gpus=0, env={}) is None  # type: ignore[arg-type]


def test_budget_rules() -> None:
    assert fit.estimate_bytes([]) == fit.FIRST_ESTIMATE_BYTES
    assert fit.estimate_bytes([10, 30, 20]) == 30
    assert fit.room_for_one(held_bytes=60, estimate=40, budget_bytes=100)
    assert not fit.room_for_one(held_bytes=61, estimate=40, budget_bytes=100)
    assert fit.room_for_one(held_bytes=10**12, estimate=40, budget_bytes=0)
    assert fit.over_budget(held_bytes=101, budget_bytes=100)
    assert not fit.over_budget(held_bytes=10**12, budget_bytes=0)
    assert fit.short_of_memory(available_bytes=1, floor_bytes=2)
    assert not fit.short_of_memory(available_bytes=None, floor_bytes=2)
    assert not fit.short_of_memory(available_bytes=1, floor_bytes=0)


async def test_pool_fills_frozen_and_a_create_claims_one(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime)
    await fill(pool)
    assert pool.size() == 2
    assert all(c.frozen and not c.seeded and c.armed for c in fake_runtime.containers.values())
    # each frozen only once its boot had settled (and after the rename was armed)
    boots = [m for m in fake_runtime.calls if m in ("start", "arm_hostname", "settle", "freeze")]
    assert boots == ["start", "arm_hostname", "settle", "freeze"] * 2
    waiting = set(pool.owned())
    ws = await create(svc, user(svc), make_repo("api"))
    assert ws.state == "running"
    assert ws.id in waiting  # it took a pooled sandbox's id and objects
    c = fake_runtime.containers[container_of(svc.spec_for(ws))]
    assert c.running and not c.frozen and c.seeded and c.hostname == "api"
    assert c.renamed_armed  # the rename made ready at fill time, not a new one
    assert c.spec.labels["den.role"] == "pool"
    assert [e.message for e in svc.events(ws.id) if e.kind == "pool"] == [
        "took a sandbox from the warm pool"]
    assert pool.size() == 1 and fake_runtime.calls.count("create") == 2  # no third create
    await fill(pool)
    assert pool.size() == 2


async def test_no_replacement_is_made_while_a_claim_runs(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    """The boot of a replacement would take the CPU of the create it replaces: the pool
    waits for the claim to end, and a little more for the claimant's first exec."""
    clock = FakeClock()
    svc, pool = pooled_service(make_service, fake_runtime, clock=clock, pool_size=1)
    await fill(pool)
    pooled = pool.take(pool.keys[0])
    assert pooled is not None and pool.size() == 0
    assert not await pool.step() and pool.refill_wait() > 0  # the claim runs
    clock.now += 10
    assert not await pool.step()
    pool.ended(pooled)
    assert pool.refill_wait() == pytest.approx(pool.refill_after_s)
    assert not await pool.step()
    clock.now += pool.refill_after_s
    assert await pool.step() and pool.size() == 1
    # a claim that never ends holds the refill back for a bounded time only
    stuck = pool.take(pool.keys[0])
    assert stuck is not None and not await pool.step()
    clock.now += warm.CLAIM_HOLDS_S
    assert await pool.step() and pool.size() == 1
    # a create ends its claim however it ends: here the normal way
    pool.ended(stuck)
    clock.now += pool.refill_after_s
    ws = await create(svc, user(svc), make_repo("api"))
    assert any(e.kind == "pool" for e in svc.events(ws.id))
    assert not await pool.step()
    clock.now += pool.refill_after_s
    assert await pool.step() and pool.size() == 1


async def test_a_create_that_does_not_fit_takes_the_normal_path(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime)
    await fill(pool)
    waiting = set(pool.owned())
    alice = user(svc)
    for name, kw in (("mem", {"memory_mb": 1024}), ("env", {"env": {"A": "1"}}),
                     ("disk", {"disk_gb": 3})):
        ws = await create(svc, alice, make_repo(name), name=name, **kw)
        assert ws.state == "running" and ws.id not in waiting
        assert not any(e.kind == "pool" for e in svc.events(ws.id))
    assert pool.size() == 2


async def test_a_devcontainer_repo_drops_its_sandbox_and_builds_fresh(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime, pool_size=1)
    await fill(pool)
    repo = make_repo("devc", files={".devcontainer.json": '{"image": "x"}'})
    ws = await create(svc, user(svc), repo)
    # the fake runtime builds no images: the create is refused, and the sandbox is gone
    assert ws.state == "error" and "--no-devcontainer" in ws.state_reason
    assert fake_runtime.containers == {} and pool.size() == 0


async def test_a_refused_create_gives_its_sandbox_back(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime, pool_size=1)
    await fill(pool)
    alice = user(svc)
    first = await create(svc, alice, make_repo("api"))
    await fill(pool)
    waiting = set(pool.owned()) - {first.id}
    with pytest.raises(Conflict):
        await create(svc, alice, make_repo("api2"), name="api")  # name taken
    assert pool.size() == 1 and waiting <= pool.owned()


async def test_a_failed_claim_boots_a_fresh_sandbox(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime, pool_size=1)
    await fill(pool)
    from server.runtime.errors import EngineError
    fake_runtime.fail_next["set_hostname"] = EngineError("no")
    ws = await create(svc, user(svc), make_repo("api"))
    assert ws.state == "running"
    c = fake_runtime.containers[container_of(svc.spec_for(ws))]
    assert c.running and not c.frozen and c.hostname == ""  # made anew, not renamed
    assert c.seeded  # the seed beside the failed rename went with the removed sandbox
    assert any("could not be taken" in e.message for e in svc.events(ws.id))


async def test_a_failed_thaw_boots_a_fresh_sandbox(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime, pool_size=1)
    await fill(pool)
    from server.runtime.errors import EngineError
    fake_runtime.fail_next["thaw"] = EngineError("no")
    ws = await create(svc, user(svc), make_repo("api"))
    assert ws.state == "running"
    c = fake_runtime.containers[container_of(svc.spec_for(ws))]
    assert c.running and c.seeded and "set_hostname" not in fake_runtime.calls
    assert len(fake_runtime.containers) == 1  # the pooled one is gone
    assert any("could not be taken" in e.message for e in svc.events(ws.id))


async def test_the_seed_runs_beside_the_rename(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim's rename and the seed both need only the thaw: the rename waits here until
    the seed has begun, which only a seed that does not wait for the rename lets happen."""
    svc, pool = pooled_service(make_service, fake_runtime, pool_size=1)
    await fill(pool)
    seeding = asyncio.Event()
    seed, rename = fake_runtime.seed, fake_runtime.set_hostname

    async def seed_first(*args: object, **kw: object) -> None:
        seeding.set()
        await seed(*args, **kw)  # type: ignore[arg-type]

    async def after_the_seed(*args: object, **kw: object) -> None:
        await seeding.wait()
        await rename(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fake_runtime, "seed", seed_first)
    monkeypatch.setattr(fake_runtime, "set_hostname", after_the_seed)
    ws = await asyncio.wait_for(create(svc, user(svc), make_repo("api")), 10)
    assert ws.state == "running"
    c = fake_runtime.containers[container_of(svc.spec_for(ws))]
    assert c.seeded and c.hostname == "api" and c.renamed_armed


async def test_a_failed_seed_of_a_claimed_sandbox_leaves_nothing(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime, pool_size=1)
    await fill(pool)
    from server.runtime.errors import EngineError
    fake_runtime.fail_next["seed"] = EngineError("the disk is full")
    ws = await create(svc, user(svc), make_repo("api"))
    assert ws.state == "error" and "the disk is full" in ws.state_reason
    assert fake_runtime.containers == {} and pool.size() == 0


async def test_a_sandbox_whose_rename_could_not_be_armed_still_serves(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime, pool_size=1)
    from server.runtime.errors import EngineError
    fake_runtime.fail_next["arm_hostname"] = EngineError("no")
    await fill(pool)
    assert pool.size() == 1
    ws = await create(svc, user(svc), make_repo("api"))
    c = fake_runtime.containers[container_of(svc.spec_for(ws))]
    assert ws.state == "running" and c.hostname == "api" and not c.renamed_armed
    assert [e.message for e in svc.events(ws.id) if e.kind == "pool"] == [
        "took a sandbox from the warm pool"]


async def test_the_budget_is_never_exceeded(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime) -> None:
    # the fake's sandboxes hold 64 MiB each: 150 MiB has room for two, not for the five asked
    _svc, pool = pooled_service(make_service, fake_runtime, pool_size=5,
                               pool_memory_budget_mb=150)
    await fill(pool)
    assert pool.size() == 2 and pool.held_bytes() <= 150 * MIB
    assert len(fake_runtime.containers) == 2  # none made and removed: the estimate held


async def test_the_pool_shrinks_when_the_host_is_short_of_memory(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime) -> None:
    available: list[int | None] = [None]
    _svc, pool = pooled_service(make_service, fake_runtime, available=available,
                               host_min_available_mb=100)
    await fill(pool)
    assert pool.size() == 2
    available[0] = 50 * MIB
    assert await pool.step()
    assert pool.size() == 1 and len(fake_runtime.containers) == 1
    await fill(pool)  # gives back the last one, makes none
    assert pool.size() == 0 and fake_runtime.containers == {}
    available[0] = 500 * MIB
    await fill(pool)
    assert pool.size() == 2


async def test_reconcile_leaves_the_pool_alone_and_a_restart_removes_it(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime) -> None:
    svc, pool = pooled_service(make_service, fake_runtime)
    await fill(pool)
    names = set(fake_runtime.containers)
    await svc.reconcile()
    assert set(fake_runtime.containers) == names and len(fake_runtime.volumes) == 2
    # a restart: a new process whose pool owns nothing yet; the old sandboxes are orphans
    svc2, pool2 = pooled_service(make_service, fake_runtime)
    await svc2.reconcile()
    assert fake_runtime.containers == {} and fake_runtime.volumes == {}
    await fill(pool2)
    assert pool2.size() == 2
    assert [await fake_runtime.status(c.spec) for c in fake_runtime.containers.values()] \
        == [ContainerStatus.FROZEN] * 2


async def test_the_loop_refills_after_a_claim(
        make_service: Callable[..., WorkspaceService], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    svc, pool = pooled_service(make_service, fake_runtime, pool_size=1)
    pool.start()
    try:
        for _ in range(200):
            if pool.size() == 1:
                break
            await asyncio.sleep(0.01)
        assert pool.size() == 1
        ws = await create(svc, user(svc), make_repo("api"))
        assert any(e.kind == "pool" for e in svc.events(ws.id))
        for _ in range(200):
            if pool.size() == 1:
                break
            await asyncio.sleep(0.01)
        assert pool.size() == 1
    finally:
        await pool.stop()
