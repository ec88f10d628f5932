"""A process of `tally serve` settles its heap once started (api/app.py settle_heap)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tally.api.app import GC_YOUNG_OBJECTS, create_app
from tally.settings import Settings


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_collector")
def test_a_served_app_freezes_what_it_holds_and_collects_less_often(settings: Settings) -> None:
    gc.unfreeze()
    with TestClient(create_app(settings, server=True)) as client:
        assert gc.get_freeze_count() > 10_000  # the modules, the app, its services
        assert gc.get_threshold()[0] == GC_YOUNG_OBJECTS
        assert client.get("/healthz").status_code == 200


@pytest.mark.usefixtures("restored_collector")
def test_an_app_in_someone_elses_process_leaves_its_collector_alone(settings: Settings) -> None:
    gc.unfreeze()
    threshold = gc.get_threshold()
    with TestClient(create_app(settings)):
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == threshold
