/* SPDX-License-Identifier: Apache-2.0 */
/* Programs on an endpoint's host-side veth (tc clsact).
 *
 *   ingress: cg_from_container - every frame the container sends: anti-spoofing, the
 *            sender's egress policy and, for a local receiver, its ingress policy too
 *   egress:  cg_to_container   - every frame the host stack sends into the container:
 *            the receiver's ingress policy
 *
 * Compiled once per agent start; everything per endpoint lives in maps.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/ctx.h"
#include "lib/events.h"
#include "lib/identity.h"
#include "lib/arp.h"
#include "lib/route.h"
#include "lib/l4.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/pipeline.h"
#include "lib/ipv4.h"
#include "lib/ipv6.h"

/* Every handler returns a tc action, or -DROP_* to drop with an event. */
static __always_inline int cg_from_container_dispatch(struct __sk_buff *skb, const struct cg_endpoint *ep,
						      struct cg_ctx *ctx)
{
	struct ethhdr eth;

	if (cg_load(skb, 0, &eth, sizeof(eth)) < 0)
		return -DROP_INVALID;
	if (!cg_mac_eq(eth.h_source, ep->mac))
		return -DROP_INVALID_SMAC;
	if (eth.h_proto == bpf_htons(ETH_P_IP))
		return cg_ipv4_from_ep(skb, ep, &eth, ctx);
	if (eth.h_proto == bpf_htons(ETH_P_IPV6))
		return cg_ipv6_from_ep(skb, ep, &eth, ctx);
	if (eth.h_proto == bpf_htons(ETH_P_ARP))
		return cg_handle_arp(skb, ep);
	return -DROP_UNKNOWN_L3;
}

int cg_from_container(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct cg_endpoint *ep = cg_endpoints.lookup(&ifindex);
	struct cg_ctx ctx = {};
	int ret;

	cg_ctx_init(&ctx, CG_DIR_FROM_EP);
	if (!ep)
		return cg_drop(skb, &ctx, DROP_NO_ENDPOINT);
	ctx.src_identity = ep->identity;
	ret = cg_from_container_dispatch(skb, ep, &ctx);
	if (ret < 0)
		return cg_drop(skb, &ctx, -ret);
	return ret;
}

static __always_inline int cg_to_container_dispatch(struct __sk_buff *skb, const struct cg_endpoint *ep,
						    struct cg_ctx *ctx)
{
	__be16 proto;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0)
		return -DROP_INVALID;
	if (proto == bpf_htons(ETH_P_IP))
		return cg_ipv4_to_ep(skb, ep, ctx);
	if (proto == bpf_htons(ETH_P_IPV6))
		return cg_ipv6_to_ep(skb, ep, ctx);
	cg_forwarded(skb, ctx, CG_OK_TO_EP);            /* ARP answers and the like */
	return TC_ACT_OK;
}

int cg_to_container(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct cg_endpoint *ep = cg_endpoints.lookup(&ifindex);
	struct cg_ctx ctx = {};
	int ret;

	cg_ctx_init(&ctx, CG_DIR_TO_EP);
	if (!ep)
		return cg_drop(skb, &ctx, DROP_NO_ENDPOINT);
	ctx.dst_identity = ep->identity;
	ret = cg_to_container_dispatch(skb, ep, &ctx);
	if (ret < 0)
		return cg_drop(skb, &ctx, -ret);
	return ret;
}
