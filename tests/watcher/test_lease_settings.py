"""The lease's timing rule, as the settings enforce it: a step waiting on the node must
never look stuck, so `watch_stuck_seconds` exceeds the node RPC timeout."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from custody.config import Settings
from custody.root import Root


@pytest.mark.unit
def test_stuck_seconds_must_outlast_a_node_call() -> None:
    with pytest.raises(ValidationError, match="watch_stuck_seconds must exceed node_rpc_timeout"):
        Settings(node_rpc_timeout=30, watch_stuck_seconds=30)
    Settings(node_rpc_timeout=30, watch_stuck_seconds=31)


@pytest.mark.unit
def test_the_watcher_gets_the_lease_and_stall_settings() -> None:
    settings = Settings(database_url="sqlite://", watch_lease_seconds=2.5, watch_stall_polls=7)
    root = Root(settings)  # an in-memory database; the node is never called
    try:
        config = root.watcher().config
    finally:
        root.close()
    assert (config.lease_seconds, config.stuck_seconds, config.stall_steps) == (2.5, 120.0, 7)
    defaults = Settings()
    assert defaults.watch_lease_seconds < defaults.node_rpc_timeout  # a short lease...
    assert defaults.watch_stuck_seconds > defaults.node_rpc_timeout  # ...that a call keeps
