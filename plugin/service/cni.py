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

import logging
from collections.abc import Sequence
from typing import Any

from datapath import naming
from datapath.errors import CellgateError, Conflict, InvalidRequest, NotFound
from datapath.model import Endpoint, IPInterface, Network
from datapath.ports import Netns
from ipam.allocator import LOCAL_SPACE, PoolRequest
from plugin import failpoints
from plugin.cni import codes
from plugin.cni.messages import AddRequest, Attachment, GcRequest
from plugin.service.agent import Agent

log = logging.getLogger(__name__)

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
                raise InvalidRequest(str(exc), cni_code=codes.INVALID_ENV) from None
            eid = att.endpoint_id
            if eid in agent.endpoints:
                raise Conflict(f"container {att.container_id} already has {att.ifname} on this host",
                               cni_code=codes.INTERFACE_EXISTS)
            try:
                if self.netns.interface(att.netns, att.ifname) is not None:
                    raise Conflict(f"interface {att.ifname} already exists in {att.netns}",
                                   cni_code=codes.INTERFACE_EXISTS)
            except InvalidRequest as exc:
                raise InvalidRequest(str(exc), cni_code=codes.INVALID_ENV) from None
            created = network_id(att.network) not in agent.networks
            net = self._network(att.network, req)
            allocated: list[tuple[str, Any]] = []
            try:
                failpoints.hit("cni.add.network_ready")
                addresses = self._addresses(net, req, allocated)
                failpoints.hit("cni.add.address_reserved")
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
                    raise InvalidRequest(f"CNI network {name!r} already uses "
                                         f"{', '.join(str(g.network) for g in net.gateways)}",
                                         cni_code=codes.INVALID_CONFIG)
            if req.ipv6 and not any(g.version == 6 for g in net.gateways):
                raise InvalidRequest(f"CNI network {name!r} was created without IPv6", cni_code=codes.INVALID_CONFIG)
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
            if not exc.cni_code:  # a network that cannot be made: the configuration's to fix
                exc.cni_code = codes.INVALID_CONFIG
            raise exc from None

    def _addresses(self, net: Network, req: AddRequest, allocated: list[tuple[str, Any]]) -> list[IPInterface]:
        """An address of every subnet of `net`: the one asked for (CNI_ARGS IP=, runtimeConfig ips)
        or the next free one. Every asked-for address is judged before anything is reserved, and
        reserved before any free one is drawn, so a refusal leaves the pools as they were."""
        where = req.attachment.network
        pools, wanted = [], []
        for gw in net.gateways:
            pool = self.agent.ipam.find_by_subnet(gw.network)
            if pool is None:
                raise NotFound(f"no address pool for {gw.network}")
            mine = [ip for ip in req.ips if ip in gw.network]
            if len(mine) > 1:
                raise InvalidRequest(f"two addresses for subnet {gw.network} of network {where}: "
                                     f"{mine[0]} and {mine[1]} (one address per subnet)",
                                     cni_code=codes.INVALID_CONFIG)
            if mine:
                pool.check_requested(mine[0])
            pools.append(pool)
            wanted.append(mine[0] if mine else None)
        unplaced = [ip for ip in req.ips if not any(ip in g.network for g in net.gateways)]
        if unplaced:
            raise InvalidRequest(f"address {unplaced[0]} is not in a subnet of network {where}",
                                 cni_code=codes.INVALID_CONFIG)
        got: dict[str, Any] = {}
        for asked in (True, False):  # the asked-for addresses first: only they can still be refused
            for pool, address in zip(pools, wanted, strict=True):
                if (address is not None) == asked:
                    _, alloc = self.agent.ipam.request_address(pool.id, address, owner=req.attachment.endpoint_id)
                    allocated.append((pool.id, alloc.address))
                    got[pool.id] = pool.prefixed(alloc.address)
        return [got[pool.id] for pool in pools]

    def _undo(self, eid: str, net: Network, allocated: Sequence[tuple[str, Any]], att: Attachment) -> None:
        try:
            self.netns.detach(att.netns, att.ifname)
        except CellgateError as exc:
            log.error("rolling back %s in %s: %s", att.ifname, att.netns, exc)
        try:
            self.agent.delete_endpoint(net.id, eid, origin="cni")
        except CellgateError as exc:
            log.error("rolling back %s: %s", eid[:12], exc)
        if eid in self.agent.endpoints:  # its removal failed: it keeps its addresses until a DEL removes it
            log.error("endpoint %s stays after a failed ADD, with its addresses", eid[:12])
            return
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
        """Remove the attachment; True if there was one. Never fails for a missing one, and one on
        another network than the DEL names is missing as far as this network goes (the endpoint ID
        derives from the container and interface alone, so the network must be compared)."""
        agent = self.agent
        nid = network_id(att.network)
        with agent._lock:
            ep = agent.endpoints.get(att.endpoint_id)
            if ep is None:
                agent.ipam.release_owner(att.endpoint_id, network_id=nid)  # what a lost ADD left here
                return False
            if ep.network_id != nid:
                log.info("CNI DEL of %s/%s on %s: it is attached to %s; nothing to do", att.container_id[:12],
                         att.ifname, att.network, self._network_name(ep.network_id))
                return False
            self._remove(ep)
            return True

    def _network_name(self, nid: str) -> str:
        net = self.agent.networks.get(nid)
        return net.name if net is not None and net.name else nid[:12]

    def _remove(self, ep: Endpoint) -> None:
        self.agent.delete_endpoint(ep.network_id, ep.id, origin="cni")  # the veth pair goes, and the inner end
        failpoints.hit("cni.del.endpoint_removed")
        freed = self.agent.ipam.release_owner(ep.id)
        failpoints.hit("cni.del.released")
        log.info("CNI %s/%s removed; released %s", ep.container_id[:12], ep.ifname,
                 ", ".join(str(a) for a in freed) or "nothing")

    def check(self, att: Attachment) -> None:
        agent = self.agent
        ep = agent.endpoints.get(att.endpoint_id)
        if ep is None:
            raise NotFound(f"no cellgate endpoint for {att.container_id}/{att.ifname}",
                           cni_code=codes.UNKNOWN_CONTAINER)
        if ep.network_id != network_id(att.network):
            raise NotFound(f"{att.container_id}/{att.ifname} is attached to network "
                           f"{self._network_name(ep.network_id)}, not {att.network}", cni_code=codes.UNKNOWN_CONTAINER)
        problems = agent.check_endpoint(ep)
        try:
            state = self.netns.interface(att.netns, att.ifname)
        except InvalidRequest as exc:
            raise InvalidRequest(str(exc), cni_code=codes.INVALID_ENV) from None
        if state is None:
            problems.append(f"interface {att.ifname} is missing from {att.netns}")
        else:
            if state.mac.lower() != ep.mac:
                problems.append(f"{att.ifname} has MAC {state.mac}, expected {ep.mac}")
            for addr in ep.addresses:
                if addr not in state.addresses:
                    problems.append(f"{att.ifname} lacks address {addr}")
        if problems:
            raise InvalidRequest("; ".join(problems), cni_code=codes.IO_FAILURE)

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

    def gc(self, req: GcRequest) -> list[str]:
        """Remove this network's attachments that are not in `req.valid`; returns their endpoint IDs."""
        keep = {naming.endpoint_id_for(cid, ifname) for cid, ifname in req.valid}
        nid = network_id(req.network)
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
