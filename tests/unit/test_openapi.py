"""The OpenAPI document describes the API as it is: auth, error bodies, media types, ranges."""

from __future__ import annotations

from typing import Any

import pytest

from server.api.schemas import ErrorOut
from tests.conftest import ApiClient

PUBLIC = {("/healthz", "get")}
ERROR_REF = "#/components/schemas/ErrorOut"


@pytest.fixture
def doc(fake_api: ApiClient) -> dict[str, Any]:
    r = fake_api.client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()  # type: ignore[no-any-return]


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, ops in doc["paths"].items()
            for method, op in ops.items()]


def test_every_operation_declares_the_bearer_scheme_except_the_public_ones(
        doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": pytest.approx(
            doc["components"]["securitySchemes"]["bearer"]["description"])}
    ops = _operations(doc)
    assert len(ops) > 30
    for path, method, op in ops:
        if (path, method) in PUBLIC:
            assert "security" not in op, path
        else:
            assert op.get("security") == [{"bearer": []}], (method, path)


def test_every_error_response_is_dens_error_body(doc: dict[str, Any]) -> None:
    for path, method, op in _operations(doc):
        responses = op["responses"]
        errors = {int(s): r for s, r in responses.items() if s[0] in "45"}
        if (path, method) not in PUBLIC:
            assert {401, 422, 500} <= set(errors), (method, path, sorted(errors))
        if "{ref}" in path or "{sid}" in path or path.endswith("_id}"):
            assert 404 in errors, (method, path)
        for status, response in errors.items():
            schema = response["content"]["application/json"]["schema"]
            if (path, method, status) == ("/healthz", "get", 503):
                # The health document itself, saying what does not work (api.md#health).
                assert schema == {"$ref": "#/components/schemas/HealthOut"}
                continue
            assert schema == {"$ref": ERROR_REF}, (method, path, status, schema)
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 body is not Den's
    assert schemas["ErrorOut"]["required"] == ["error"]
    assert set(schemas["ErrorDetail"]["required"]) == {"code", "message"}


def test_real_errors_match_the_documented_body(fake_api: ApiClient) -> None:
    for r in (fake_api.get("/api/v1/workspaces/nope"), fake_api.client.get("/api/v1/users/me"),
              fake_api.post("/api/v1/workspaces", json={"name": 5})):
        assert r.status_code >= 400
        ErrorOut.model_validate(r.json(), strict=True)


def test_the_files_api_declares_its_media_types(doc: dict[str, Any]) -> None:
    files = doc["paths"]["/api/v1/workspaces/{ref}/files"]
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    assert files["get"]["responses"]["200"]["content"] == binary
    assert files["put"]["requestBody"]["content"] == binary
    assert files["put"]["requestBody"]["required"] is True
    params = {p["name"]: p for p in files["get"]["parameters"]}
    assert params["path"]["schema"]["maxLength"] == 4096


def test_numeric_ranges_are_in_the_schemas(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]

    def prop(model: str, field: str) -> dict[str, Any]:
        p: dict[str, Any] = schemas[model]["properties"][field]
        return p["anyOf"][0] if "anyOf" in p else p

    assert prop("ResourcesIn", "memory_mb")["minimum"] == 128
    assert prop("ResourcesIn", "cpus")["minimum"] == 0.1
    assert prop("ResourcesIn", "gpus")["minimum"] == 0
    assert prop("WorkspaceCreate", "idle_timeout_s")["maximum"] == 365 * 86400
    assert prop("KeepaliveIn", "ttl_s")["minimum"] == 0
    assert prop("ExecIn", "timeout_s")["exclusiveMinimum"] == 0
    assert (prop("ExecIn", "cols")["minimum"], prop("ExecIn", "cols")["maximum"]) == (1, 1000)
    assert prop("SpawnIn", "log_bytes")["minimum"] == 1024
    for path in ("/api/v1/users/me/tokens/{token_id}", "/api/v1/users/me/ssh-keys/{key_id}",
                 "/api/v1/users/me/forges/{account_id}"):
        (param,) = doc["paths"][path]["delete"]["parameters"]
        assert (param["schema"]["minimum"], param["schema"]["maximum"]) == (1, 2**31 - 1)
