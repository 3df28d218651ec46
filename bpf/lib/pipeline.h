/* SPDX-License-Identifier: Apache-2.0 */
/* The stages of the IP pipeline that IPv4 and IPv6 share, written once on the family-neutral
 * flow (struct cg_flow) and address bytes: who the parties are, conntrack and policy, and
 * where an allowed packet goes. lib/ipv4.h and lib/ipv6.h parse and check their own headers,
 * then call these; the next stages (encapsulation, load balancing) go here.
 */
#pragma once

#include "lib/common.h"
#include "lib/ctx.h"
#include "lib/events.h"
#include "lib/identity.h"
#include "lib/l4.h"
#include "lib/policy.h"
#include "lib/proxy.h"
#include "lib/route.h"

/* From an endpoint, once the family's checks passed: the local receiver (*dst, NULL when the
 * host stack takes the packet), both parties' identities, conntrack and both sides of policy.
 * 0 if allowed, else -DROP_*. */
static __always_inline int cg_stage_from_ep(struct __sk_buff *skb, struct cg_ctx *ctx,
					    const struct cg_endpoint *ep, const struct cg_flow *f,
					    __u8 family, const __u8 *daddr, struct cg_endpoint **dst)
{
	struct cg_endpoint *local = cg_lookup_ip(family, daddr);

	*dst = local;
	ctx->src_identity = ep->identity;
	ctx->dst_identity = cg_dst_identity(local, family, daddr, &ctx->dst_node);
	return cg_policy_flow(skb, ctx, f, 1, local != NULL);
}

/* From another node through the tunnel, to the local endpoint *dst: the sender's identity came
 * in the VNI (ctx->src_identity); conntrack and the receiver's ingress policy. 0 if allowed. */
static __always_inline int cg_stage_from_tunnel(struct __sk_buff *skb, struct cg_ctx *ctx,
						const struct cg_flow *f, const struct cg_endpoint *dst)
{
	ctx->dst_identity = dst->identity;
	return cg_policy_flow(skb, ctx, f, 0, 1);
}

/* Host-bound, routed out, or expiring: the stack knows what to do. */
static __always_inline int cg_stage_to_stack(struct __sk_buff *skb, const struct cg_ctx *ctx)
{
	cg_forwarded(skb, ctx, CG_OK_STACK);
	return TC_ACT_OK;
}

/* Into an endpoint from the host stack: the sender's identity (the proxy's upstream sockets
 * carry it in their mark), conntrack and the receiver's ingress policy, then the verdict. L7
 * rules cannot be enforced here (tc egress cannot assign a socket): such flows from anyone but
 * the proxy drop. A tc action, or -DROP_*. */
static __always_inline int cg_stage_to_ep(struct __sk_buff *skb, struct cg_ctx *ctx, const struct cg_flow *f,
					  __u8 family, const __u8 *saddr)
{
	int ret;

	if (cg_from_proxy(skb)) {
		ctx->src_identity = cg_mark_identity(skb->mark);
		ctx->from_proxy = 1;
	} else {
		ctx->src_identity = cg_peer_identity(family, saddr);
	}
	ret = cg_policy_flow(skb, ctx, f, 0, 1);
	if (ret < 0)
		return ret;
	if (ctx->proxy)
		return -DROP_PROXY_REQUIRED;
	cg_forwarded(skb, ctx, CG_OK_TO_EP);
	return TC_ACT_OK;
}
