"""The proxy's event sink (datagrams to the agent, never blocking; the JSON-lines access log) and
the supervisor's port choice and PID-file checks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from plugin.proxy.flows import Flow, L7Event
from plugin.proxy.main import EventSink
from plugin.proxy.supervisor import choose_port, stop_left_over

FLOW = Flow(("10.0.0.2", 40000), ("10.0.0.3", 80), 300, 301, None, None, 0, ("app=a",), ("app=b",))


def test_events_go_to_the_agent_and_the_access_log(tmp_path: Path) -> None:
    path = str(tmp_path / "events.sock")
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    agent.bind(path)
    sink = EventSink(path, str(tmp_path / "access.log"))
    sink(L7Event("http", "denied", FLOW, "ingress", 3, http={"method": "GET", "path": "/x", "status": 403}))
    got = json.loads(agent.recv(65536))
    line = json.loads((tmp_path / "access.log").read_text().splitlines()[0])
    assert got == line
    assert (got["type"], got["verdict"], got["rule"], got["http"]["status"]) == ("l7", "denied", 3, 403)
    assert (got["src"], got["dst"], got["src_identity"], got["dst_labels"]) == ("10.0.0.2:40000", "10.0.0.3:80",
                                                                                300, ["app=b"])
    agent.close()


def test_a_slow_or_absent_agent_never_blocks_the_proxy(tmp_path: Path) -> None:
    path = str(tmp_path / "events.sock")
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    agent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    agent.bind(path)  # bound, never read: its queue fills
    sink = EventSink(path, "")
    for _ in range(2000):
        sink(L7Event("kafka", "forwarded", FLOW, kafka={"api_key": 0, "topics": ["t"]}))
    assert sink.lost > 0  # dropped, counted, and the calls returned
    agent.close()
    os.unlink(path)
    gone = EventSink(path, "")
    gone(L7Event("http", "forwarded", FLOW))
    assert gone.lost == 1


def test_the_port_is_chosen_once_and_kept(tmp_path: Path) -> None:
    first = choose_port(tmp_path / "proxy", 0)
    assert 0 < first < 65536
    assert choose_port(tmp_path / "proxy", 0) == first  # kept across restarts
    assert choose_port(tmp_path / "proxy", 4242) == 4242  # an explicit port wins


def test_cleanup_ends_only_a_proxy_of_this_state_dir(tmp_path: Path) -> None:
    (tmp_path / "proxy.pid").write_text(f"{os.getpid()}\n")  # this process is no proxy of ours
    assert stop_left_over(tmp_path) == 0
    (tmp_path / "proxy.pid").write_text("not a number\n")
    assert stop_left_over(tmp_path) == 0
    assert stop_left_over(tmp_path / "absent") == 0
