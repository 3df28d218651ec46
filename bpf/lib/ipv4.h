/* SPDX-License-Identifier: Apache-2.0 */
/* IPv4 from an endpoint: anti-spoofing, conntrack and policy, then local delivery or
 * the host stack; and IPv4 from the host stack into an endpoint. */
#pragma once

#include "lib/common.h"
#include "lib/events.h"
#include "lib/route.h"
#include "lib/l4.h"
#include "lib/pipeline.h"
#include "lib/encap.h"
#include "lib/lbpkt.h"

#define CG_IP4_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define CG_IP4_TTL_OFF  (ETH_HLEN + offsetof(struct iphdr, ttl))

static __always_inline int cg_ipv4_from_ep(struct __sk_buff *skb, const struct cg_endpoint *ep,
					   const struct ethhdr *eth, struct cg_ctx *ctx)
{
	struct cg_flow f = {};
	struct cg_endpoint *dst;
	struct iphdr ip;
	__u8 ttl;
	int ret;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -DROP_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return -DROP_INVALID;
	if (!(ep->flags & CG_EP_F_IPV4))
		return -DROP_NO_IPV4;
	if (ip.saddr != ep->ipv4 && !cg_sandbox_owns(ep, 4, &ip.saddr))
		return -DROP_INVALID_SIP;
	if (!cg_mac_eq(eth->h_dest, ep->host_mac))
		return -DROP_INVALID_DMAC;

	ret = cg_flow_ipv4(skb, &ip, &f, 1);
	if (ret < 0)
		return ret;
	ret = cg_stage_from_ep(skb, ctx, ep, &f, 4, (const __u8 *)&ip.daddr, &dst);
	if (ret < 0)
		return ret;
	if (ctx->proxy)
		return cg_redirect_proxy(skb, ctx, &f);
	ret = cg_lb_reply4(skb, ctx, &ip, &f);              /* a backend answering a balanced client */
	if (ret < 0)
		return ret;
	if (!dst && ctx->tunnel_ifindex && ip.ttl > 1) {
		ret = cg_stage_encap(skb, ctx);
		if (ret != CG_NO_ENCAP)
			return ret;
	}
	if (!dst || ip.ttl <= 1)
		return cg_stage_to_stack(skb, ctx);
	ttl = ip.ttl - 1;
	bpf_l3_csum_replace(skb, CG_IP4_CSUM_OFF, bpf_htons(ip.ttl << 8), bpf_htons(ttl << 8), 2);
	bpf_skb_store_bytes(skb, CG_IP4_TTL_OFF, &ttl, 1, 0);
	return cg_deliver_local(skb, ctx, dst);
}

static __always_inline int cg_ipv4_to_ep(struct __sk_buff *skb, const struct cg_endpoint *ep, struct cg_ctx *ctx)
{
	struct cg_flow f = {};
	struct iphdr ip;
	int ret;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
		return -DROP_INVALID;
	ret = cg_flow_ipv4(skb, &ip, &f, 0);
	if (ret < 0)
		return ret;
	return cg_stage_to_ep(skb, ctx, &f, 4, (const __u8 *)&ip.saddr);
}
