"""CNI attachments, served by the agent for the `cellgate-cni` binary.

An attachment is (container ID, interface name); its endpoint ID is derived from both, so
every command finds the same endpoint without a lookup table. A CNI network (by name)
becomes an agent network on first use, with its subnet from the configuration or from
the host range, exactly like a Docker network. ADD is all-or-nothing: any failure
removes what it made (interface, endpoint, addresses, and the network with its pools when
this ADD created it) before the error goes back. DEL always succeeds when the attachment
is already gone. A CNI network with no attachments left is removed on request (`cellgate
network rm`); Docker networks are Docker's to remove.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datapath import naming
from datapath.errors import CellgateError, Conflict, InvalidRequest, NotFound
from datapath.model import Endpoint, IPInterface, Network
from datapath.ports import Netns
from ipam.allocator import LOCAL_SPACE, PoolRequest
from plugin import failpoints
from plugin.service import Agent

log = logging.getLogger(__name__)

CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,255}$")
IFNAME = re.compile(r"^[^/:\s]{1,15}$")
NETWORK = re.compile(r"^[A-Za-z0-9][\w.\-]{0,127}$")
MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

# CNI error codes carried back to the binary
CNI_INVALID_ENV = 4
CNI_IO = 5
CNI_INVALID_CONFIG = 7
CNI_UNKNOWN_CONTAINER = 3
CNI_INTERFACE_EXISTS = 100


def cni_error(exc: CellgateError, code: int) -> CellgateError:
    exc.cni_code = code  # type: ignore[attr-defined]
    return exc


def _str(body: Mapping[str, Any], key: str, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string")
    if not value:
        if required:
            raise InvalidRequest(f"{key} is required")
        return ""
    if pattern is not None and not pattern.match(value):
        raise InvalidRequest(f"{key} {value[:80]!r} is not valid")
    return value


@dataclass(frozen=True)
class Attachment:
    network: str
    container_id: str
    ifname: str
    netns: str

    @property
    def endpoint_id(self) -> str:
        return naming.endpoint_id_for(self.container_id, self.ifname)

    @classmethod
    def parse(cls, body: Mapping[str, Any], netns_required: bool) -> Attachment:
        netns = _str(body, "netns", required=netns_required)
        if netns and (not netns.startswith("/") or "\0" in netns or len(netns) > 4096):
            raise cni_error(InvalidRequest(f"netns {netns[:80]!r} must be an absolute path"), CNI_INVALID_ENV)
        try:
            return cls(_str(body, "network", NETWORK), _str(body, "container_id", CONTAINER_ID),
                       _str(body, "ifname", IFNAME), netns)
        except InvalidRequest as exc:
            raise cni_error(exc, CNI_INVALID_ENV) from None


@dataclass(frozen=True)
class AddRequest:
    attachment: Attachment
    labels: dict[str, str]
    label_source: str
    subnet: ipaddress.IPv4Network | None
    ipv6: bool
    subnet6: ipaddress.IPv6Network | None
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    mac: str
    name: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> AddRequest:
        att = Attachment.parse(body, netns_required=True)
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            raise InvalidRequest("labels must be an object of strings")
        source = _str(body, "label_source", required=False) or "cni"
        if source not in ("cni", "mesos"):
            raise InvalidRequest(f"label_source {source!r} must be cni or mesos")
        try:
            subnet = ipaddress.IPv4Network(body["subnet"]) if body.get("subnet") else None
            subnet6 = ipaddress.IPv6Network(body["ipv6_subnet"]) if body.get("ipv6_subnet") else None
            ips = tuple(ipaddress.ip_address(str(x).split("/")[0]) for x in body.get("ips") or [])
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(str(exc)) from None
        mac = _str(body, "mac", required=False)
        if mac and (not MAC.match(mac) or int(mac[:2], 16) & 1):
            raise cni_error(InvalidRequest(f"MAC {mac!r} is not a unicast MAC address"), CNI_INVALID_ENV)
        return cls(att, dict(labels), source, subnet, bool(body.get("ipv6")) or subnet6 is not None, subnet6, ips,
                   mac.lower(), _str(body, "name", required=False)[:253])


def network_id(name: str) -> str:
    return naming.cni_network_id(name)


class CniService:
    def __init__(self, agent: Agent, netns: Netns) -> None:
        self.agent = agent
        self.netns = netns

    # -- ADD --------------------------------------------------------------------------------

    def add(self, req: AddRequest) -> dict[str, Any]:
        att = req.attachment
        agent = self.agent
        with agent._lock:
            try:
                self.netns.check(att.netns)
            except InvalidRequest as exc:
                raise cni_error(exc, CNI_INVALID_ENV) from None
            eid = att.endpoint_id
            if eid in agent.endpoints:
                raise cni_error(Conflict(f"container {att.container_id} already has {att.ifname} on this host"),
                                CNI_INTERFACE_EXISTS)
            try:
                if self.netns.interface(att.netns, att.ifname) is not None:
                    raise cni_error(Conflict(f"interface {att.ifname} already exists in {att.netns}"),
                                    CNI_INTERFACE_EXISTS)
            except InvalidRequest as exc:
                raise cni_error(exc, CNI_INVALID_ENV) from None
            created = network_id(att.network) not in agent.networks
            net = self._network(att.network, req)
            allocated: list[tuple[str, Any]] = []
            try:
                addresses = self._addresses(net, req, allocated)
                v4 = next((a for a in addresses if a.version == 4), None)
                v6 = next((a for a in addresses if a.version == 6), None)
                ep = agent.create_endpoint(net.id, eid, v4, v6, mac=req.mac, origin="cni", labels=req.labels,
                                           label_source=req.label_source,  # type: ignore[arg-type]
                                           attachment=(att.container_id, att.ifname), sandbox=att.netns)
                failpoints.hit("cni.add.before_attach")
                gateways = [g for g in (ep.gateway4, ep.gateway6) if g is not None]
                routed = self.netns.attach(att.netns, ep.peer_ifname, att.ifname, ep.addresses, gateways)
                failpoints.hit("cni.add.after_attach")
            except CellgateError:
                self._undo(eid, net, allocated, att)
                if created:  # this call made the network: a corrected configuration must find none
                    self._drop_network_quietly(net)
                raise
            log.info("CNI %s/%s on %s: %s", att.container_id[:12], att.ifname, att.network,
                     ", ".join(str(a) for a in ep.addresses))
            return self._result(ep, att, routed)

    def _network(self, name: str, req: AddRequest) -> Network:
        agent = self.agent
        nid = network_id(name)
        net = agent.networks.get(nid)
        if net is not None:
            for want in (req.subnet, req.subnet6):
                if want is not None and not any(g.network == want for g in net.gateways):
                    raise cni_error(InvalidRequest(f"CNI network {name!r} already uses "
                                                   f"{', '.join(str(g.network) for g in net.gateways)}"),
                                    CNI_INVALID_CONFIG)
            if req.ipv6 and not any(g.version == 6 for g in net.gateways):
                raise cni_error(InvalidRequest(f"CNI network {name!r} was created without IPv6"), CNI_INVALID_CONFIG)
            return net
        pools = []
        try:
            pools.append(agent.request_pool(PoolRequest(LOCAL_SPACE, req.subnet, None, False)))
            if req.ipv6:
                pools.append(agent.request_pool(PoolRequest(LOCAL_SPACE, req.subnet6, None, True)))
            gateways: list[IPInterface] = [p.prefixed(p.gateway) for p in pools if p.gateway is not None]
            return agent.create_network(nid, gateways, name=name)
        except CellgateError as exc:
            for pool in pools:
                agent.ipam.release_pool(pool.id)
            raise cni_error(exc, getattr(exc, "cni_code", CNI_INVALID_CONFIG)) from None

    def _addresses(self, net: Network, req: AddRequest, allocated: list[tuple[str, Any]]) -> list[IPInterface]:
        out: list[IPInterface] = []
        for gw in net.gateways:
            pool = self.agent.ipam.find_by_subnet(gw.network)
            if pool is None:
                raise NotFound(f"no address pool for {gw.network}")
            wanted = next((ip for ip in req.ips if ip in gw.network), None)
            _, alloc = self.agent.ipam.request_address(pool.id, wanted, {}, owner=req.attachment.endpoint_id)
            allocated.append((pool.id, alloc.address))
            out.append(pool.prefixed(alloc.address))
        unplaced = [ip for ip in req.ips if not any(ip in g.network for g in net.gateways)]
        if unplaced:
            where = req.attachment.network
            raise cni_error(InvalidRequest(f"address {unplaced[0]} is not in a subnet of network {where}"),
                            CNI_INVALID_CONFIG)
        return out

    def _undo(self, eid: str, net: Network, allocated: Sequence[tuple[str, Any]], att: Attachment) -> None:
        try:
            self.netns.detach(att.netns, att.ifname)
        except CellgateError as exc:
            log.error("rolling back %s in %s: %s", att.ifname, att.netns, exc)
        try:
            self.agent.delete_endpoint(net.id, eid)
        except CellgateError as exc:
            log.error("rolling back %s: %s", eid[:12], exc)
        for pool_id, address in allocated:
            self.agent.ipam.release_address(pool_id, address)
        self.agent.ipam.release_owner(eid)

    def _drop_network(self, net: Network) -> None:
        """Remove a CNI network that nothing is attached to, and the pools it was given."""
        self.agent.drop_network(net.id)

    def _drop_network_quietly(self, net: Network) -> None:
        if any(e.network_id == net.id for e in self.agent.endpoints.values()):
            return  # still used (cannot happen under the lock, but never remove a used network)
        try:
            self._drop_network(net)
        except CellgateError as exc:
            log.error("rolling back CNI network %s: %s", net.name, exc)

    @staticmethod
    def _result(ep: Endpoint, att: Attachment, routed: Sequence[Any]) -> dict[str, Any]:
        """The result in 1.x form; routes only for what was really installed."""
        ips, routes = [], []
        for addr, gw in ((ep.ipv4, ep.gateway4), (ep.ipv6, ep.gateway6)):
            if addr is None:
                continue
            ips.append({"address": str(addr), "gateway": str(gw) if gw else "", "interface": 0})
            if gw is not None and gw in routed:
                routes.append({"dst": "0.0.0.0/0" if addr.version == 4 else "::/0", "gw": str(gw)})
        return {
            "interfaces": [{"name": att.ifname, "mac": ep.mac, "sandbox": att.netns}],
            "ips": ips,
            "routes": routes,
            "dns": {},
        }

    # -- DEL, CHECK, GC, STATUS -------------------------------------------------------------

    def delete(self, att: Attachment) -> bool:
        """Remove the attachment; True if there was one. Never fails for a missing one."""
        agent = self.agent
        with agent._lock:
            ep = agent.endpoints.get(att.endpoint_id)
            if ep is None:
                agent.ipam.release_owner(att.endpoint_id)
                return False
            self._remove(ep)
            return True

    def _remove(self, ep: Endpoint) -> None:
        self.agent.delete_endpoint(ep.network_id, ep.id)  # the veth pair goes, and with it the inner end
        freed = self.agent.ipam.release_owner(ep.id)
        log.info("CNI %s/%s removed; released %s", ep.container_id[:12], ep.ifname,
                 ", ".join(str(a) for a in freed) or "nothing")

    def check(self, att: Attachment) -> None:
        agent = self.agent
        ep = agent.endpoints.get(att.endpoint_id)
        if ep is None:
            raise cni_error(NotFound(f"no cellgate endpoint for {att.container_id}/{att.ifname}"),
                            CNI_UNKNOWN_CONTAINER)
        problems = agent.check_endpoint(ep)
        try:
            state = self.netns.interface(att.netns, att.ifname)
        except InvalidRequest as exc:
            raise cni_error(exc, CNI_INVALID_ENV) from None
        if state is None:
            problems.append(f"interface {att.ifname} is missing from {att.netns}")
        else:
            if state.mac.lower() != ep.mac:
                problems.append(f"{att.ifname} has MAC {state.mac}, expected {ep.mac}")
            for addr in ep.addresses:
                if addr not in state.addresses:
                    problems.append(f"{att.ifname} lacks address {addr}")
        if problems:
            raise cni_error(InvalidRequest("; ".join(problems)), CNI_IO)

    # -- networks ---------------------------------------------------------------------------

    def remove_network(self, ident: str) -> Network:
        """Remove a CNI network (by name, ID or ID prefix) with no attachments, and its pools."""
        agent = self.agent
        with agent._lock:
            net = self._find_network(ident)
            if net.origin != "cni":
                raise InvalidRequest(f"network {net.id[:12]} is a Docker network: remove it with "
                                     f"`docker network rm`")
            attached = sorted(f"{e.container_id}/{e.ifname}" for e in agent.endpoints.values()
                              if e.network_id == net.id)
            if attached:
                shown = ", ".join(attached[:5]) + (", ..." if len(attached) > 5 else "")
                raise Conflict(f"CNI network {net.name!r} still has {len(attached)} attachment(s) ({shown}); "
                               "remove them first (CNI DEL, e.g. by removing the containers)")
            self._drop_network(net)
            log.info("CNI network %s (%s) removed", net.name, net.id[:12])
            return net

    def _find_network(self, ident: str) -> Network:
        networks = self.agent.networks
        if ident in networks:
            return networks[ident]
        by_name = [n for n in networks.values() if n.name == ident and n.origin == "cni"]
        if by_name:
            return by_name[0]
        matches = [n for n in networks.values() if ident and n.id.startswith(ident)]
        if not matches:
            raise NotFound(f"no network matches {ident[:80]!r}")
        if len(matches) > 1:
            raise InvalidRequest(f"{ident!r} matches {len(matches)} networks; give more of the ID")
        return matches[0]

    def gc(self, network: str, valid: Sequence[tuple[str, str]]) -> list[str]:
        """Remove this network's attachments that are not in `valid`; returns their endpoint IDs."""
        keep = {naming.endpoint_id_for(cid, ifname) for cid, ifname in valid}
        nid = network_id(network)
        removed = []
        with self.agent._lock:
            for ep in list(self.agent.endpoints.values()):
                if ep.network_id == nid and ep.origin == "cni" and ep.id not in keep:
                    try:
                        self._remove(ep)
                    except CellgateError as exc:
                        log.warning("GC of %s: %s", ep.id[:12], exc)  # GC goes on past errors
                        continue
                    removed.append(ep.id)
        return removed
