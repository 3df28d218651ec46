"""Learn container labels from Docker and reconcile with it, off the request path.

libnetwork never tells a network driver which container an endpoint belongs to, and
calling Docker from inside a driver call deadlocks dockerd. So a thread of its own
follows the events stream: on `container start` and `network connect` it reads the
container's labels and endpoint IDs from `GET /containers/json` (a snapshot that takes
no container lock) and hands them to the Agent. It resyncs everything whenever the
stream (re)connects and every `resync` seconds, in case an event was lost.

Docker never replays the calls it made while the agent was down (`docker rm`, `network
rm`, `network disconnect`, a dockerd restart). So on every (re)connect and resync the
thread also takes a snapshot of Docker's networks and containers (`RuntimeView`) and
lets the Agent remove what Docker no longer has. A snapshot that fails removes nothing.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from datapath.errors import CellgateError
from plugin.service import Agent, RuntimeView

log = logging.getLogger(__name__)


class DockerWatcher:
    def __init__(self, agent: Agent, base_url: str, resync: float = 60.0, driver: str = "") -> None:
        self.agent = agent
        self.driver = driver  # the name Docker knows us by, when not the instance's (a managed plugin: NAME:latest)
        self.base_url = base_url
        self.resync_interval = resync
        self.connected = False
        self.last_sync = 0.0
        self._client: Any = None
        self._warned = False
        self._recheck_at: float | None = None  # a young suspect becomes judgeable then

    def run(self, stop: threading.Event) -> None:
        import docker

        backoff = 1.0
        while not stop.is_set():
            failed = False
            try:
                self._client = docker.APIClient(base_url=self.base_url, version="auto", timeout=30)
                self.resync()
                self.connected, backoff, self._warned = True, 1.0, False
                log.info("following Docker events at %s", self.base_url)
                self._follow(stop)
            except Exception as exc:
                self.connected, failed = False, True
                if not self._warned:
                    log.warning("cannot follow Docker events at %s (%s); retrying", self.base_url, exc)
                    self._warned = True
            finally:
                self._close()
            if failed:
                # A failed attempt leaves its socket in a reference cycle (the HTTP client's exception
                # chain): collected now that the exception is gone, not at the next collection, which
                # the agent makes rare (bootstrap.settle_heap). A full one: the cycle may have been
                # promoted to the oldest generation during the attempt (at most once a second).
                gc.collect()
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _follow(self, stop: threading.Event) -> None:
        while not stop.is_set():
            until = time.time() + self.resync_interval
            if self._recheck_at is not None:
                until = min(until, self._recheck_at)
            # An endless stream, closed when the resync is due: the docker client keeps a connection
            # pool per URL, so a stream ending at `until=` (a new URL each time) would leave one idle
            # connection behind per resync, up to its 25 pools.
            events = self._client.events(decode=True, filters={"type": ["container", "network"]})
            due = threading.Timer(max(0.0, until - time.time()), events.close)
            due.daemon = True
            due.start()
            try:
                for event in events:
                    if stop.is_set():
                        return
                    self._handle(event)
            finally:
                due.cancel()
                events.close()
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
        if event.get("Type") == "container" and action in ("start", "destroy") and self.agent.kept_addresses():
            # Addresses kept for containers whose veth vanished are held while Docker's record of a
            # container names them (a stopped container keeps its last one): a container that starts
            # with another or goes away may have let one go, so judge them again now.
            self.resync()
        elif event.get("Type") == "network" and action == "connect":
            self.sync_container((actor.get("Attributes") or {}).get("container", ""))

    def sync_container(self, container_id: str) -> None:
        if not container_id:
            return
        # A client of its own, closed after: the docker client keeps a connection pool per URL, and this
        # one is new for every container (its ID is in the query), so a long-lived client would keep one
        # idle connection per container started, up to its 25 pools.
        import docker

        client = docker.APIClient(base_url=self.base_url, version=self._client.api_version, timeout=30)
        try:
            self._apply(client.containers(filters={"id": [container_id]}))
        finally:
            client.close()

    def resync(self) -> None:
        view, containers = self._view(self._client)
        self._apply(containers)
        self.last_sync = time.time()
        report = self.agent.reconcile(view)
        self._recheck_at = report.recheck_at

    def view(self) -> RuntimeView:
        """A fresh snapshot of Docker (for `ipam check`): its own connection, any thread."""
        import docker

        client = docker.APIClient(base_url=self.base_url, version="auto", timeout=10)
        try:
            return self._view(client)[0]
        finally:
            client.close()

    def _view(self, client: Any) -> tuple[RuntimeView, list[dict[str, Any]]]:
        """Docker's networks and containers (any state) as one snapshot, and the containers."""
        taken = time.time()  # before asking: what we made after this may not be in the answer
        networks = client.networks()
        containers = client.containers(all=True)
        names = {self.agent.settings.instance, self.driver or self.agent.settings.instance}
        ours, subnets = set(), set()
        for net in networks:
            if net.get("Driver") in names:
                ours.add(str(net.get("Id", "")))
            ipam = net.get("IPAM") or {}
            if ipam.get("Driver") in names:
                for conf in ipam.get("Config") or []:
                    with contextlib.suppress(ValueError, TypeError):
                        subnets.add(ipaddress.ip_network(conf.get("Subnet", "")))
        endpoints, addresses = set(), set()
        for container in containers:
            for entry in ((container.get("NetworkSettings") or {}).get("Networks") or {}).values():
                attached = entry or {}
                if attached.get("EndpointID"):
                    endpoints.add(str(attached["EndpointID"]))
                for key in ("IPAddress", "GlobalIPv6Address"):
                    with contextlib.suppress(ValueError, TypeError):
                        addresses.add(ipaddress.ip_address(attached.get(key) or ""))
        view = RuntimeView(taken, frozenset(ours), frozenset(endpoints), frozenset(addresses), frozenset(subnets))
        return view, containers

    def _apply(self, containers: Iterable[dict[str, Any]]) -> None:
        for container in containers:
            labels = container.get("Labels") or {}
            networks = ((container.get("NetworkSettings") or {}).get("Networks") or {}).values()
            for net in networks:
                endpoint_id = (net or {}).get("EndpointID") or ""
                if self.agent.get_endpoint(endpoint_id) is None:
                    continue
                try:
                    self.agent.set_labels(endpoint_id, {str(k): str(v) for k, v in labels.items()})
                except CellgateError as exc:
                    log.warning("labels of endpoint %s: %s", endpoint_id[:12], exc)
