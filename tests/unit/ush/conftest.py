"""Fixtures of ush's tests: a fake controller on loopback, served from a thread.

ush uses the blocking :class:`usher.client.Client`, so the tests are plain
functions and the controller (the client tests' :class:`FakeController`)
runs on an event loop in a thread of its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from tests.unit.client.fake_controller import FakeController, Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def controller(pki: Pki) -> Iterator[FakeController]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-controller", daemon=True)
    thread.start()
    fake = FakeController(pki)
    fake.loop = loop  # type: ignore[attr-defined]
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(5)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
