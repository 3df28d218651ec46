/* SPDX-License-Identifier: Apache-2.0 */
/* Program on a node's own devices (tc clsact ingress, the devices given with --lb-devices):
 *
 *   cg_from_netdev - a packet for a service VIP (a client the socket programs do not serve)
 *                    is balanced to a backend chosen once per flow (lib/lbpkt.h): a local
 *                    backend through the stack, a remote one by direct server return; a VIP
 *                    without backends is left to its `unreachable` route (ICMP to the client).
 *                    In native routing, a packet carrying our DSR option for a local endpoint
 *                    is recorded so that its replies answer as the service.
 *
 * Everything else passes untouched. IPv4 only; compiled with the other programs, sharing maps.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/ctx.h"
#include "lib/events.h"
#include "lib/identity.h"
#include "lib/route.h"
#include "lib/lb.h"
#include "lib/lbpkt.h"
#include "lib/encap.h"

/* Find (or pick) the backend of this flow into *out: 1, 0 if no service, -1 if none to serve. */
static __always_inline int cg_netdev_backend(const struct iphdr *ip, __be16 sport, __be16 dport,
					     struct cg_lb_flow_value *out, int *is_new)
{
	struct cg_lb_flow_value *flow;
	struct cg_lb_value *svc, *be;
	struct cg_lb_flow_key fk;
	struct cg_lb_key k;
	__u64 now = bpf_ktime_get_ns();
	__u16 slot;

	cg_lb_key_init(&k, 4, (const __u8 *)&ip->daddr, dport, ip->protocol);
	svc = cg_lb_service(&k);
	if (!svc)
		return 0;
	if (!svc->count)
		return -1;
	cg_lb_flow_key4(&fk, ip->saddr, ip->daddr, sport, dport, ip->protocol);
	flow = cg_lb_flows.lookup(&fk);
	if (flow && flow->slot && flow->slot <= svc->count) {
		be = cg_lb_backend(&k, flow->slot);
		if (be && be->port == flow->port && cg_ip6_eq(be->addr, flow->addr)) {
			flow->expires = now + CG_LB_FLOW_NS;
			*out = *flow;
			*is_new = 0;
			return 1;
		}
	}
	slot = cg_lb_pick(svc);                         /* new flow, or its backend left: choose again */
	be = cg_lb_backend(&k, slot);
	if (!be)
		return -1;
	__builtin_memset(out, 0, sizeof(*out));
	__builtin_memcpy(out->addr, be->addr, 16);
	out->port = be->port;
	out->slot = slot;
	out->rev_nat = svc->rev_nat;
	out->expires = now + CG_LB_FLOW_NS;
	cg_lb_flows.update(&fk, out);
	*is_new = 1;
	return 1;
}

static __always_inline int cg_from_netdev_ipv4(struct __sk_buff *skb, struct cg_ctx *ctx)
{
	struct cg_lb_flow_value be;
	struct cg_ipcache_value *node;
	struct iphdr ip;
	__be16 ports[2];
	__u8 tcp_flags = 0;
	__be32 backend;
	int is_new = 0, ret;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4)
		return TC_ACT_OK;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	if (ip.frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK;                            /* fragments: the stack reassembles; not balanced */
	if (ip.ihl != 5) {
		if (!ctx->tunnel_ifindex && cg_lookup_ip(4, &ip.daddr))
			cg_dsr_learn4(skb, &ip);             /* native routing: DSR towards a local backend */
		return TC_ACT_OK;
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 20, ports, sizeof(ports)) < 0)
		return TC_ACT_OK;
	if (ip.protocol == IPPROTO_TCP && bpf_skb_load_bytes(skb, ETH_HLEN + 20 + 13, &tcp_flags, 1) < 0)
		return TC_ACT_OK;
	ret = cg_netdev_backend(&ip, ports[0], ports[1], &be, &is_new);
	if (ret <= 0)
		return TC_ACT_OK;                            /* not a service, or none to serve: the route refuses */
	__builtin_memcpy(&backend, be.addr, 4);
	ret = cg_nat4(skb, ip.protocol, ETH_HLEN + 20, CG_IP4_DADDR, ip.daddr, backend, ETH_HLEN + 20 + 2,
		      ports[1], be.port);
	if (ret < 0)
		return ret;
	ctx->src_identity = cg_ipcache_identity(4, (const __u8 *)&ip.saddr);
	if (cg_lookup_ip(4, &backend)) {
		/* A local backend: its replies are translated back in cg_from_container. */
		struct cg_lb_flow_value rev = {};
		struct cg_lb_flow_key rk;

		cg_lb_flow_key4(&rk, backend, ip.saddr, be.port, ports[0], ip.protocol);
		__builtin_memcpy(rev.addr, &ip.daddr, 4);
		rev.port = ports[1];
		rev.expires = be.expires;
		cg_lb_flows.update(&rk, &rev);
		cg_translated(skb, ctx, CG_OK_LB, is_new);
		return TC_ACT_OK;
	}
	/* Direct server return needs a node of ours at the backend's end to translate its replies:
	 * a cluster endpoint (its node known from the ipcache when tunnelling). */
	node = cg_ipcache_find(4, (const __u8 *)&backend);
	if (!node || node->identity < CG_ID_FIRST_ALLOCATED || node->identity > CG_TUNNEL_MAX_ID ||
	    (ctx->tunnel_ifindex && !node->tunnel_endpoint))
		return -DROP_LB_BACKEND;
	if (ip.protocol == IPPROTO_UDP || (tcp_flags & CG_TCP_F_SYN)) {
		ret = cg_dsr_add_opt4(skb, ip.daddr, ports[1]);
		if (ret < 0)
			return ret;
	}
	if (ctx->tunnel_ifindex) {
		ret = cg_set_tunnel(skb, ctx->src_identity, node->tunnel_endpoint);
		if (ret < 0)
			return ret;
		cg_translated(skb, ctx, CG_OK_LB_DSR, is_new);
		return bpf_redirect(ctx->tunnel_ifindex, 0);
	}
	cg_translated(skb, ctx, CG_OK_LB_DSR, is_new);
	return TC_ACT_OK;                                    /* native routing: the route via the peer */
}

int cg_from_netdev(struct __sk_buff *skb)
{
	struct cg_ctx ctx = {};
	__be16 proto;
	int ret;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0 ||
	    proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	cg_ctx_init(&ctx, CG_DIR_TO_EP);
	ret = cg_from_netdev_ipv4(skb, &ctx);
	if (ret < 0)
		return cg_drop(skb, &ctx, -ret);
	return ret;
}
