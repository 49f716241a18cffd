"""Fixtures of the client's seam tests: the site PKI, a fake controller, clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from usher.client import AsyncClient

from .fake_controller import PASSWORD, USER, FakeController, Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def controller(pki: Pki) -> AsyncIterator[FakeController]:
    fake = FakeController(pki)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def make_client(pki: Pki) -> Callable[..., AsyncClient]:
    def make(port: int, **kwargs: Any) -> AsyncClient:
        options: dict[str, Any] = {"ca_cert": str(pki.ca), "user": USER, "password": PASSWORD,
                                   "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2,
                                   "reconnect_budget_s": 5.0, "connect_timeout_s": 5.0}
        options.update(kwargs)
        return AsyncClient("127.0.0.1", port, **options)
    return make
