"""Configuration is one typed, documented tree (datasette's test_docs.py): every setting is in
docs/configuration.md, and the Settings section documents nothing that is not a setting."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from server.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
FIELDS = sorted(Settings.model_fields)


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.exists(), f"{DOC} is missing"
    return DOC.read_text()


def _settings_section(doc: str) -> str:
    match = re.search(r"^## Settings\n(.*?)(?=^## )", doc, re.S | re.M)
    assert match is not None, "docs/configuration.md has no '## Settings' section"
    return match.group(1)


@pytest.mark.parametrize("field", FIELDS)
def test_every_setting_is_documented(doc: str, field: str) -> None:
    var = f"DEN_{field.upper()}"
    assert re.search(rf"`{var}`", _settings_section(doc)), (
        f"{var} (Settings.{field}) is not documented in docs/configuration.md")


def test_the_settings_section_documents_only_settings(doc: str) -> None:
    documented = set(re.findall(r"^\|\s*`(DEN_[A-Z0-9_]+)`", _settings_section(doc), re.M))
    assert documented == {f"DEN_{f.upper()}" for f in FIELDS}


@pytest.mark.parametrize("field", FIELDS)
def test_every_setting_has_a_description(field: str) -> None:
    description = Settings.model_fields[field].description
    assert description and len(description.strip()) > 10, field


def test_settings_read_the_den_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEN_PORT", "9000")
    monkeypatch.setenv("DEN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DEN_LOCAL_REPO_ROOTS", f'["{tmp_path}"]')
    monkeypatch.setenv("DEN_ALLOW_INSECURE_RUNC", "true")
    monkeypatch.setenv("PORT", "1")
    s = Settings()
    assert (s.port, s.data_dir, s.local_repo_roots, s.allow_insecure_runc) == (
        9000, tmp_path, [tmp_path], True)
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'den.db'}"


def test_secure_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.upper().startswith("DEN_")]:
        monkeypatch.delenv(var)
    s = Settings()
    assert s.allow_insecure_runc is False
    assert s.local_repo_roots == []
    assert "http" not in s.allowed_git_schemes
    assert s.allowed_git_schemes == ["https", "ssh", "git"]
    assert s.gvisor_runtime == "runsc"
    assert s.max_gpus == 8
    assert s.gpus == "auto" and s.gpu_checkpoint is False
