"""REST monitor: events of allowed new flows are switched on only while a monitor shows verdicts."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from plugin.monitor import EventHub
from plugin.service import Agent


@pytest.mark.parametrize(("query", "wanted"), [("", True), ("?type=verdict", True), ("?type=drop", False),
                                               ("?type=trace", False)])
def test_verdict_events_only_while_a_monitor_shows_them(
    api: FlaskClient, agent: Agent, hub: EventHub, monkeypatch: pytest.MonkeyPatch, query: str, wanted: bool
) -> None:
    seen: list[bool] = []

    def stream(accept: Any, heartbeat: float = 2.0) -> Any:
        seen.append(getattr(agent.kernel, "verdicts", False))
        yield None

    monkeypatch.setattr(hub, "stream", stream)
    resp = api.get(f"/v1/monitor{query}")
    assert resp.status_code == 200
    resp.get_data()  # run the stream to its end
    assert seen == [wanted]
    assert getattr(agent.kernel, "verdicts", False) is False  # off again once the monitor is gone
