/* SPDX-License-Identifier: Apache-2.0 */
/* IPv6 from an endpoint: neighbour discovery answered here, router messages dropped,
 * anti-spoofing, then local delivery or the host stack. */
#pragma once

#include "lib/common.h"
#include "lib/events.h"
#include "lib/route.h"
#include "lib/l4.h"
#include "lib/pipeline.h"
#include "lib/encap.h"

#define CG_IP6_HOPLIMIT_OFF (ETH_HLEN + offsetof(struct ipv6hdr, hop_limit))
#define CG_ICMP6_OFF        (ETH_HLEN + sizeof(struct ipv6hdr))

struct cg_nd_msg {            /* neighbour solicitation / advertisement + one LL option */
	__u8   type;
	__u8   code;
	__be16 csum;
	__be32 flags;
	__u8   target[16];
	__u8   opt_type;
	__u8   opt_len;
	__u8   lladdr[6];
};

struct cg_ip6_pseudo {
	__u8   saddr[16];
	__u8   daddr[16];
	__be32 len;
	__be32 nexthdr;
};

struct cg_na_frame {
	struct ethhdr   eth;
	struct ipv6hdr  ip6;
	struct cg_nd_msg na;
} __attribute__((packed));

static __always_inline int cg_ip6_is_unspec(const __u8 *a)
{
	const __u32 *x = (const __u32 *)a;

	return (x[0] | x[1] | x[2] | x[3]) == 0;
}

static __always_inline int cg_ip6_is_linklocal(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

/* Answer a neighbour solicitation for any address but the endpoint's own with the
 * gateway MAC (router, solicited, override), built in place and sent back out. */
static __always_inline int cg_handle_ns(struct __sk_buff *skb, const struct cg_endpoint *ep,
					const struct ipv6hdr *ip6)
{
	struct cg_na_frame frame = {};
	struct cg_ip6_pseudo ph = {};
	struct cg_nd_msg ns;
	struct cg_nd_msg na = {};
	__s64 sum;

	if (!(ep->flags & CG_EP_F_IPV6))
		return cg_quiet(skb);
	if (bpf_skb_load_bytes(skb, CG_ICMP6_OFF, &ns, 24) < 0)
		return -DROP_INVALID;
	if (ip6->hop_limit != 255 || ns.code != 0)
		return -DROP_INVALID;
	if (cg_ip6_is_unspec(ip6->saddr.in6_u.u6_addr8))
		return cg_quiet(skb);                          /* duplicate address detection */
	if (!cg_ip6_eq(ip6->saddr.in6_u.u6_addr8, ep->ipv6) &&
	    !cg_ip6_is_linklocal(ip6->saddr.in6_u.u6_addr8))
		return -DROP_INVALID_SIP;
	if (cg_ip6_eq(ns.target, ep->ipv6))
		return cg_quiet(skb);

	na.type = 136;                                     /* neighbour advertisement */
	na.flags = bpf_htonl(0xe0000000);                  /* router | solicited | override */
	__builtin_memcpy(na.target, ns.target, 16);
	na.opt_type = 2;                                   /* target link-layer address */
	na.opt_len = 1;
	cg_mac_copy(na.lladdr, ep->host_mac);

	__builtin_memcpy(ph.saddr, ns.target, 16);
	__builtin_memcpy(ph.daddr, ip6->saddr.in6_u.u6_addr8, 16);
	ph.len = bpf_htonl(sizeof(na));
	ph.nexthdr = bpf_htonl(IPPROTO_ICMPV6);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&na, sizeof(na), (__u32)sum);
	na.csum = cg_csum_fold(sum);

	cg_mac_copy(frame.eth.h_dest, ep->mac);
	cg_mac_copy(frame.eth.h_source, ep->host_mac);
	frame.eth.h_proto = bpf_htons(ETH_P_IPV6);
	frame.ip6.version = 6;
	frame.ip6.payload_len = bpf_htons(sizeof(na));
	frame.ip6.nexthdr = IPPROTO_ICMPV6;
	frame.ip6.hop_limit = 255;
	__builtin_memcpy(frame.ip6.saddr.in6_u.u6_addr8, ns.target, 16);
	__builtin_memcpy(frame.ip6.daddr.in6_u.u6_addr8, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(&frame.na, &na, sizeof(na));

	if (bpf_skb_change_tail(skb, sizeof(frame), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, &frame, sizeof(frame), 0) < 0)
		return -DROP_INVALID;
	cg_count(skb, CG_OK_ND, 0); /* answered to the endpoint that asked */
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int cg_ipv6_from_ep(struct __sk_buff *skb, const struct cg_endpoint *ep,
					   const struct ethhdr *eth, struct cg_ctx *ctx)
{
	struct cg_flow f = {};
	struct cg_endpoint *dst;
	struct ipv6hdr ip6;
	__u8 hops;
	int ret;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return -DROP_INVALID;
	if (ip6.version != 6)
		return -DROP_INVALID;

	if (ip6.nexthdr == IPPROTO_ICMPV6) {
		__u8 type;

		if (bpf_skb_load_bytes(skb, CG_ICMP6_OFF, &type, 1) < 0)
			return -DROP_INVALID;
		switch (type) {
		case 135:                                  /* neighbour solicitation */
			return cg_handle_ns(skb, ep, &ip6);
		case 134:                                  /* router advertisement */
		case 137:                                  /* redirect */
			return -DROP_ROUTER_ADV;
		case 133:                                  /* router solicitation */
		case 136:                                  /* unsolicited advertisement */
		case 130: case 131: case 132: case 143:    /* multicast listener discovery */
			return cg_quiet(skb);
		}
	} else if (ip6.nexthdr == IPPROTO_HOPOPTS && ip6.daddr.in6_u.u6_addr8[0] == 0xff) {
		return cg_quiet(skb);                      /* MLD report behind a router alert */
	}

	if (!(ep->flags & CG_EP_F_IPV6))
		return -DROP_NO_IPV6;
	if (!cg_ip6_eq(ip6.saddr.in6_u.u6_addr8, ep->ipv6) &&
	    !cg_sandbox_owns(ep, 6, ip6.saddr.in6_u.u6_addr8))
		return -DROP_INVALID_SIP;
	if (!cg_mac_eq(eth->h_dest, ep->host_mac))
		return -DROP_INVALID_DMAC;

	ret = cg_flow_ipv6(skb, &ip6, &f, 1);
	if (ret < 0)
		return ret;
	ret = cg_stage_from_ep(skb, ctx, ep, &f, 6, ip6.daddr.in6_u.u6_addr8, &dst);
	if (ret < 0)
		return ret;
	if (ctx->proxy)
		return cg_redirect_proxy(skb, ctx, &f);
	if (!dst && ctx->tunnel_ifindex && ip6.hop_limit > 1) {
		ret = cg_stage_encap(skb, ctx);
		if (ret != CG_NO_ENCAP)
			return ret;
	}
	if (!dst || ip6.hop_limit <= 1)
		return cg_stage_to_stack(skb, ctx);
	hops = ip6.hop_limit - 1;
	bpf_skb_store_bytes(skb, CG_IP6_HOPLIMIT_OFF, &hops, 1, 0);
	return cg_deliver_local(skb, ctx, dst);
}

static __always_inline int cg_ipv6_to_ep(struct __sk_buff *skb, const struct cg_endpoint *ep, struct cg_ctx *ctx)
{
	struct cg_flow f = {};
	struct ipv6hdr ip6;
	int ret;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
		return -DROP_INVALID;
	if (ip6.daddr.in6_u.u6_addr8[0] == 0xff) {          /* multicast from the host: MLD and the like */
		cg_forwarded(skb, ctx, CG_OK_TO_EP);
		return TC_ACT_OK;
	}
	if (ip6.nexthdr == IPPROTO_ICMPV6) {
		__u8 type;

		if (bpf_skb_load_bytes(skb, CG_ICMP6_OFF, &type, 1) < 0)
			return -DROP_INVALID;
		if (type >= 130 && type <= 143) {          /* neighbour discovery and MLD: link plumbing */
			cg_forwarded(skb, ctx, CG_OK_TO_EP);
			return TC_ACT_OK;
		}
	}
	ret = cg_flow_ipv6(skb, &ip6, &f, 0);
	if (ret < 0)
		return ret;
	return cg_stage_to_ep(skb, ctx, &f, 6, ip6.saddr.in6_u.u6_addr8);
}
