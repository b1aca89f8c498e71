"""The per-user limits' race-safety on both databases: two creates at once on two
connections (two servers on one PostgreSQL) cannot both take the last slot."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.config import Settings
from tests.unit.test_quotas import race_for_the_last_slot

pytestmark = pytest.mark.postgres


def test_two_creates_at_once_cannot_both_take_the_last_slot(
        db_url: str, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(database_url=db_url, max_workspaces_per_user=1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    race_for_the_last_slot(settings)
