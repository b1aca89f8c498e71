"""The preview access decision's cache (server/preview/cache.py): bounded, expiring, safe
across a load that races an invalidation. That every revocation stops a preview with the
next request is tested through the app in test_preview_fake.py."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from sqlalchemy import delete, insert, update

from server.db.models import Event, PreviewPort, User, Workspace
from server.preview.cache import AccessCache, writes_watched
from tests.conftest import FakeClock

# --- the cache itself ------------------------------------------------------------------------


def test_a_value_is_loaded_once_per_ttl() -> None:
    clock = FakeClock(100.0)
    cache = AccessCache(ttl_s=5, clock=clock)
    loads: list[int] = []

    def load() -> int:
        loads.append(1)
        return len(loads)

    assert [cache.get("k", load) for _ in range(3)] == [1, 1, 1]
    clock.now += 4.9
    assert cache.get("k", load) == 1
    clock.now += 0.2
    assert cache.get("k", load) == 2
    assert (cache.hits, cache.misses) == (3, 2)
    assert cache.get("none", lambda: None) is None
    assert cache.get("none", lambda: 7) is None  # None is remembered too (no such row)


def test_it_is_bounded_least_recently_used_out_first() -> None:
    cache = AccessCache(size=3)
    for k in "abc":
        cache.get(k, lambda k=k: k)  # type: ignore[misc]
    cache.get("a", lambda: "reloaded")  # used: now the newest
    cache.get("d", lambda: "d")
    assert len(cache) == 3
    assert cache.get("b", lambda: "gone") == "gone"  # the oldest went out
    assert cache.get("a", lambda: "reloaded") == "a"


def test_invalidate_forgets_everything_and_a_load_across_it_is_not_kept() -> None:
    cache = AccessCache()
    cache.get("k", lambda: "old")
    cache.invalidate()
    assert cache.get("k", lambda: "new") == "new"

    def racing() -> str:  # the rows change (and the cache is told) while this load runs
        cache.invalidate()
        return "read before the change"

    cache.invalidate()
    assert cache.get("r", racing) == "read before the change"
    assert cache.get("r", lambda: "fresh") == "fresh"


def test_the_cache_is_safe_across_threads() -> None:
    cache = AccessCache(size=50)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(2000):
                assert cache.get((n, i % 80), lambda i=i: i % 80) == i % 80  # type: ignore[misc]
                if i % 97 == 0:
                    cache.invalidate()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) <= 50


def test_which_writes_invalidate() -> None:
    now = datetime.now(UTC)
    assert writes_watched(update(Workspace).values(state="stopped"))
    assert writes_watched(update(Workspace).values(state="x", last_activity_at=now))
    assert not writes_watched(update(Workspace).values(last_activity_at=now))  # activity only
    assert writes_watched(delete(Workspace))
    assert writes_watched(insert(PreviewPort))
    assert writes_watched(update(User).values(is_admin=True))
    assert not writes_watched(delete(Event))
