"""Shared pytest fixtures. They are thin: the classes live in tests/support/. Support modules
that import relayd are imported inside their fixture, so that a relayd module that fails to
import breaks the tests that use it, not the collection of every test."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.clock import FakeClock  # after the sys.path entry above
from tests.support.oauth_server import TokenServers

if TYPE_CHECKING:
    from tests.support.config_builder import ConfigBuilder
    from tests.support.postgres import Cluster
    from tests.support.upstream import Upstreams


@pytest.fixture
def clock() -> FakeClock:
    """A fake ``time.time`` at a fixed instant; the test moves it with ``advance``."""
    return FakeClock()


@pytest.fixture
def config_builder(tmp_path: Path) -> ConfigBuilder:
    """Writes relayd.yaml files under tmp_path with the test defaults:
    ``config_builder.write([smarthost, ...], **overrides)``."""
    from tests.support.config_builder import ConfigBuilder

    return ConfigBuilder(tmp_path)


@pytest.fixture
def token_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TokenServers]:
    """Starts fake OAuth token endpoints: ``token_server(clients={...}, https=...)``; all are
    stopped when the test ends."""
    servers = TokenServers(tmp_path, monkeypatch.setenv)
    yield servers
    servers.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstreams]:
    """Starts scriptable fake smarthosts: ``await upstream(**FakeUpstream options)``; all are
    stopped when the test ends."""
    from tests.support.upstream import Upstreams

    upstreams = Upstreams()
    yield upstreams
    await upstreams.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the session (tests/support/postgres.py), stopped
    by PID at the end."""
    from tests.support.postgres import start_cluster

    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg(pg_cluster: Cluster) -> Cluster:
    """The session's cluster with an empty ``relayd`` database (no tables yet) and running."""
    if pg_cluster.pid() is None:  # a test stopped it
        pg_cluster.start()
    pg_cluster.reset()
    return pg_cluster
