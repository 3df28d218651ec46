/* SPDX-License-Identifier: Apache-2.0 */
/* Programs on the instance's VXLAN device (tc clsact), for the overlay between nodes.
 *
 *   ingress: cg_from_overlay - every frame another node tunnelled here: the outer source must
 *            be a known node, the VNI is the sender's identity (a node's own HOST identity
 *            becomes REMOTE_NODE), the destination a local endpoint; conntrack and its
 *            ingress policy, then straight into it. Host addresses are not reached this way
 *            (dropped with DROP_NOT_LOCAL): nodes talk to each other over the underlay.
 *   egress:  cg_to_overlay   - what the host stack routes into the tunnel (host processes to
 *            remote endpoints): the tunnel endpoint from the ipcache, identity HOST (the L7
 *            proxy's upstream sockets: the sender's, from their mark). Frames an endpoint's
 *            program already encapsulated pass unchanged.
 *
 * A flow whose receiver's ingress entry carries L7 rules goes to this node's proxy (lib/proxy.h).
 *
 * Compiled together with cg_lxc.c, once per agent start; they share every map.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/ctx.h"
#include "lib/events.h"
#include "lib/identity.h"
#include "lib/route.h"
#include "lib/l4.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/pipeline.h"
#include "lib/encap.h"
#include "lib/proxy.h"
#include "lib/lbpkt.h"

/* The inner packet's addresses and flow, for either family. 0, or -DROP_*. */
static __always_inline int cg_overlay_flow(struct __sk_buff *skb, __u8 family, struct cg_flow *f,
					   __u8 *saddr, __u8 *daddr)
{
	if (family == 4) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
			return -DROP_INVALID;
		__builtin_memcpy(saddr, &ip.saddr, 4);
		__builtin_memcpy(daddr, &ip.daddr, 4);
		return cg_flow_ipv4(skb, &ip, f, 0);
	}
	{
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
			return -DROP_INVALID;
		__builtin_memcpy(saddr, ip6.saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(daddr, ip6.daddr.in6_u.u6_addr8, 16);
		return cg_flow_ipv6(skb, &ip6, f, 0);
	}
}

static __always_inline int cg_from_overlay_dispatch(struct __sk_buff *skb, struct cg_ctx *ctx)
{
	struct bpf_tunnel_key key = {};
	struct cg_ipcache_value *node, *src;
	struct cg_endpoint *dst;
	struct cg_flow f = {};
	__u8 saddr[16] = {}, daddr[16] = {};
	__be32 outer;
	__be16 proto;
	__u8 family;
	int ret;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return -DROP_NO_TUNNEL_KEY;
	outer = bpf_htonl(key.remote_ipv4);
	node = cg_ipcache_find(4, (const __u8 *)&outer);
	if (!node || node->identity != CG_ID_REMOTE_NODE)
		return -DROP_UNKNOWN_NODE;
	ctx->src_identity = key.tunnel_id == CG_ID_HOST ? CG_ID_REMOTE_NODE : key.tunnel_id;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0)
		return -DROP_INVALID;
	if (proto == bpf_htons(ETH_P_IP))
		family = 4;
	else if (proto == bpf_htons(ETH_P_IPV6))
		family = 6;
	else
		return -DROP_UNKNOWN_L3;
	ret = cg_overlay_flow(skb, family, &f, saddr, daddr);
	if (ret < 0)
		return ret;
	src = cg_ipcache_find(family, saddr);
	if (src && src->tunnel_endpoint && src->tunnel_endpoint != outer)
		return -DROP_TUNNEL_SRC;                    /* another node's address, sent from this one */
	dst = cg_lookup_ip(family, daddr);
	if (!dst)
		return -DROP_NOT_LOCAL;
	if (family == 4) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) == 0 && ip.ihl == 7)
			cg_dsr_learn4(skb, &ip);             /* balanced by another node: reply as the service */
	}
	ret = cg_stage_from_tunnel(skb, ctx, &f, dst);
	if (ret < 0)
		return ret;
	if (ctx->proxy)
		return cg_redirect_proxy(skb, ctx, &f);       /* the receiver's ingress L7 rules */
	return cg_deliver_local(skb, ctx, dst);
}

int cg_from_overlay(struct __sk_buff *skb)
{
	struct cg_ctx ctx = {};
	int ret;

	cg_ctx_init(&ctx, CG_DIR_TO_EP);
	ret = cg_from_overlay_dispatch(skb, &ctx);
	if (ret < 0)
		return cg_drop(skb, &ctx, -ret);
	return ret;
}

static __always_inline int cg_to_overlay_dispatch(struct __sk_buff *skb, struct cg_ctx *ctx)
{
	struct bpf_tunnel_key key = {};
	struct cg_ipcache_value *val;
	__u8 daddr[16] = {};
	__be16 proto;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0)
		return TC_ACT_OK;                           /* encapsulated by cg_stage_encap */
	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0)
		return -DROP_INVALID;
	if (proto == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, daddr), daddr, 4) < 0)
			return -DROP_INVALID;
		val = cg_ipcache_find(4, daddr);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, daddr), daddr, 16) < 0)
			return -DROP_INVALID;
		if (daddr[0] == 0xff)
			return cg_quiet(skb);                   /* the stack's own multicast chatter */
		val = cg_ipcache_find(6, daddr);
	} else {
		return -DROP_UNKNOWN_L3;
	}
	if (!val || !val->tunnel_endpoint)
		return -DROP_NO_TUNNEL_ENDPOINT;
	/* The proxy's upstream sockets speak for the sender whose identity their mark carries. */
	ctx->src_identity = cg_from_proxy(skb) ? cg_mark_identity(skb->mark) : CG_ID_HOST;
	ctx->dst_identity = val->identity;
	{
		int ret = cg_set_tunnel(skb, ctx->src_identity, val->tunnel_endpoint);

		if (ret < 0)
			return ret;
	}
	cg_forwarded(skb, ctx, CG_OK_TUNNEL);
	return TC_ACT_OK;
}

int cg_to_overlay(struct __sk_buff *skb)
{
	struct cg_ctx ctx = {};
	int ret;

	cg_ctx_init(&ctx, CG_DIR_FROM_EP);
	ret = cg_to_overlay_dispatch(skb, &ctx);
	if (ret < 0)
		return cg_drop(skb, &ctx, -ret);
	return ret;
}
