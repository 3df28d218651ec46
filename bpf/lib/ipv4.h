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


/* Local delivery of IPv4 as a router does it: new MACs, TTL one less, the header checksum
 * updated for that (RFC 1624, as the kernel's ip_decrease_ttl), all in one store of the
 * Ethernet header and the IP header's first 12 bytes. */
static __always_inline int cg_ipv4_deliver_local(struct __sk_buff *skb, const struct cg_ctx *ctx,
						 const struct cg_endpoint *dst, const struct iphdr *ip)
{
	struct {
		__u8 dmac[6];
		__u8 smac[6];
		__be16 proto;
		__u8 ip[8];         /* version/ihl .. frag_off, unchanged */
		__u8 ttl;
		__u8 protocol;
		__sum16 check;
	} __attribute__((packed)) hdr;
	__u32 check = ip->check;

	cg_mac_copy(hdr.dmac, dst->mac);
	cg_mac_copy(hdr.smac, dst->host_mac);
	hdr.proto = bpf_htons(ETH_P_IP);
	__builtin_memcpy(hdr.ip, ip, sizeof(hdr.ip));
	hdr.ttl = ip->ttl - 1;
	hdr.protocol = ip->protocol;
	check += bpf_htons(0x0100);
	hdr.check = (__sum16)(check + (check >= 0xFFFF));
	if (bpf_skb_store_bytes(skb, 0, &hdr, sizeof(hdr), 0) < 0)
		return -DROP_INVALID;
	return cg_redirect_local(skb, ctx, dst);
}

static __always_inline int cg_ipv4_from_ep(struct __sk_buff *skb, const struct cg_endpoint *ep,
					   const struct ethhdr *eth, struct cg_ctx *ctx)
{
	struct cg_flow f = {};
	struct cg_endpoint *dst;
	struct iphdr ip;
	int ret;

	if (cg_load(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
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
	if (ret > 0 && bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)  /* as rewritten */
		return -DROP_INVALID;
	if (!dst && ctx->tunnel_ifindex && ip.ttl > 1) {
		ret = cg_stage_encap(skb, ctx);
		if (ret != CG_NO_ENCAP)
			return ret;
	}
	if (!dst || ip.ttl <= 1)
		return cg_stage_to_stack(skb, ctx);
	return cg_ipv4_deliver_local(skb, ctx, dst, &ip);
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
