"""The Docker backend's one seam for foreign exceptions, without an engine: what the SDK
raises becomes a Den error, and the engine's stats of a container deleted meanwhile (an
answer that is not JSON) read as "not running" instead of escaping."""

from __future__ import annotations

from typing import Any

import docker.errors
import pytest
import requests
import requests.exceptions

from server.errors import DenError
from server.runtime.base import ResourceUsage
from server.runtime.docker import _stats_usage, _translate
from server.runtime.errors import EngineError, EngineUnavailable, ObjectMissing


def _not_json() -> requests.exceptions.JSONDecodeError:
    return requests.exceptions.JSONDecodeError("Expecting value", "", 0)


class _Api:
    """The two calls ``_stats_usage`` makes, answering as told."""

    def __init__(self, stats: Any, *, exists: bool) -> None:
        self._stats = stats
        self._exists = exists

    def stats(self, container: str, *, stream: bool, one_shot: bool) -> Any:
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats

    def inspect_container(self, container: str) -> dict[str, Any]:
        if not self._exists:
            raise docker.errors.NotFound("No such container")
        return {"State": {"Running": True}}


@pytest.mark.parametrize(("exc", "expected"), [
    (docker.errors.NotFound("gone"), ObjectMissing),
    (requests.exceptions.ConnectionError("refused"), EngineUnavailable),
    (_not_json(), EngineError),
    (requests.exceptions.ReadTimeout("slow"), EngineError),
])
def test_translate_leaves_no_foreign_exception(exc: Exception, expected: type) -> None:
    assert type(_translate(exc, "stats of workspace w")) is expected


def test_stats_of_a_deleted_container_is_no_reading() -> None:
    assert _stats_usage(_Api(_not_json(), exists=False), "den-w") is None
    assert _stats_usage(_Api(docker.errors.NotFound("gone"), exists=False), "den-w") is None


def test_stats_that_are_not_json_for_a_live_container_are_an_engine_error() -> None:
    with pytest.raises(DenError):
        _stats_usage(_Api(_not_json(), exists=True), "den-w")


def test_stats_reading() -> None:
    stats: dict[str, Any] = {"cpu_stats": {"cpu_usage": {"total_usage": 1234}}}
    assert _stats_usage(_Api(stats, exists=True), "den-w") == ResourceUsage(1234, None)
    assert _stats_usage(_Api({"cpu_stats": {}}, exists=True), "den-w") is None
    # Memory as `docker stats` shows it: usage less the inactive file cache (v1, then v2).
    stats["memory_stats"] = {"usage": 5000, "stats": {"total_inactive_file": 1000}}
    assert _stats_usage(_Api(stats, exists=True), "den-w") == ResourceUsage(1234, 4000)
    stats["memory_stats"] = {"usage": 5000, "stats": {"inactive_file": 3000}}
    assert _stats_usage(_Api(stats, exists=True), "den-w") == ResourceUsage(1234, 2000)


def test_engine_errors_do_not_show_host_paths() -> None:
    """Issue 11, finding 8: the engine's messages named host paths."""
    explanation = ("failed to create task for container: failed to create shim task: OCI "
                   "runtime create failed: open /var/lib/docker/overlay2/3f9a/merged/etc/x: "
                   "no such file or directory")
    exc = docker.errors.APIError("500 Server Error", explanation=explanation)
    err = _translate(exc, "start of workspace w")
    assert isinstance(err, EngineError)
    assert "/var/lib" not in err.message and "overlay2" not in err.message
    assert err.message.endswith("open …: no such file or directory"), err.message
    assert "/var/lib/docker/overlay2/3f9a/merged/etc/x" in err.detail  # for the log
    missing = ObjectMissing("saved memory at /srv/den/data/snapshots/sn1")
    assert missing.message == "saved memory at …" and missing.status_code == 404
    assert "in /workspace" in EngineError("no space left in /workspace").message


@pytest.mark.anyio
async def test_a_runsc_registered_without_den_s_flags_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Without --net-disconnect-ok a pause after network use loses the workspace's
    processes: say so at start, not at every periodic engine check."""
    from server.runtime.docker import DockerRuntime

    rt = DockerRuntime()
    info = {"Runtimes": {"runsc": {"path": "/x", "runtimeArgs": ["--overlay2=none"]}}}
    rt._api = lambda: type("Api", (), {"info": staticmethod(lambda: info)})()  # type: ignore[method-assign]
    with caplog.at_level("WARNING"):
        await rt.check()
        await rt.check()
    missing = [r.getMessage() for r in caplog.records if "runs without" in r.getMessage()]
    assert len(missing) == 1 and "--net-disconnect-ok" in missing[0], missing
