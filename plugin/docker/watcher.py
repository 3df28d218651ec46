"""Learn container labels from Docker, off the request path.

libnetwork never tells a network driver which container an endpoint belongs to, and
calling Docker from inside a driver call deadlocks dockerd. So a thread of its own
follows the events stream: on `container start` and `network connect` it reads the
container's labels and endpoint IDs from `GET /containers/json` (a snapshot that takes
no container lock) and hands them to the Agent. It resyncs everything whenever the
stream (re)connects and every `resync` seconds, in case an event was lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from datapath.errors import CellgateError
from plugin.service import Agent

log = logging.getLogger(__name__)


class DockerWatcher:
    def __init__(self, agent: Agent, base_url: str, resync: float = 60.0) -> None:
        self.agent = agent
        self.base_url = base_url
        self.resync_interval = resync
        self.connected = False
        self.last_sync = 0.0
        self._client: Any = None
        self._warned = False

    def run(self, stop: threading.Event) -> None:
        import docker

        backoff = 1.0
        while not stop.is_set():
            try:
                self._client = docker.APIClient(base_url=self.base_url, version="auto", timeout=30)
                self.resync()
                self.connected, backoff, self._warned = True, 1.0, False
                log.info("following Docker events at %s", self.base_url)
                self._follow(stop)
            except Exception as exc:
                self.connected = False
                if not self._warned:
                    log.warning("cannot follow Docker events at %s (%s); retrying", self.base_url, exc)
                    self._warned = True
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                self._close()

    def _follow(self, stop: threading.Event) -> None:
        while not stop.is_set():
            until = int(time.time() + self.resync_interval)
            events = self._client.events(decode=True, until=until,
                                         filters={"type": ["container", "network"]})
            for event in events:
                if stop.is_set():
                    return
                self._handle(event)
            self.resync()

    def stop(self) -> None:
        self._close()

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _handle(self, event: dict[str, Any]) -> None:
        action = event.get("Action") or event.get("status") or ""
        actor = event.get("Actor") or {}
        if event.get("Type") == "container" and action == "start":
            self.sync_container(actor.get("ID") or event.get("id", ""))
        elif event.get("Type") == "network" and action == "connect":
            self.sync_container((actor.get("Attributes") or {}).get("container", ""))

    def sync_container(self, container_id: str) -> None:
        if not container_id:
            return
        self._apply(self._client.containers(filters={"id": [container_id]}))

    def resync(self) -> None:
        self._apply(self._client.containers())
        self.last_sync = time.time()

    def _apply(self, containers: Iterable[dict[str, Any]]) -> None:
        for container in containers:
            labels = container.get("Labels") or {}
            networks = ((container.get("NetworkSettings") or {}).get("Networks") or {}).values()
            for net in networks:
                endpoint_id = (net or {}).get("EndpointID") or ""
                if endpoint_id not in self.agent.endpoints:
                    continue
                try:
                    self.agent.set_labels(endpoint_id, {str(k): str(v) for k, v in labels.items()})
                except CellgateError as exc:
                    log.warning("labels of endpoint %s: %s", endpoint_id[:12], exc)
