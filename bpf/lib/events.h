/* SPDX-License-Identifier: Apache-2.0 */
/* Verdict accounting: per-CPU counters for every verdict, ring-buffer events for drops. */
#pragma once

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/ctx.h"

static __always_inline void cg_count(struct __sk_buff *skb, __u32 code, __u8 dir)
{
	__u32 index = (code & (CG_METRICS_CODES - 1)) | ((__u32)(dir & 1) << 8);
	struct cg_metric *m = cg_metrics.lookup(&index);

	if (m) {
		m->packets += 1;
		m->bytes += skb->len;
	}
}

/* Describe the packet without trusting it: every read is bounds-checked by
 * bpf_skb_load_bytes, so a truncated frame yields a partial event, never a fault. */
static __always_inline void cg_event_describe(struct __sk_buff *skb, struct cg_event *ev)
{
	struct ethhdr eth;
	__u32 l4off = 0;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return;
	cg_mac_copy(ev->smac, eth.h_source);
	cg_mac_copy(ev->dmac, eth.h_dest);
	ev->ethertype = bpf_ntohs(eth.h_proto);

	if (eth.h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			return;
		__builtin_memcpy(ev->saddr, &ip.saddr, 4);
		__builtin_memcpy(ev->daddr, &ip.daddr, 4);
		ev->l4proto = ip.protocol;
		if (ip.frag_off & bpf_htons(0x1fff))
			return; /* not the first fragment: no L4 header here */
		l4off = ETH_HLEN + ip.ihl * 4;
	} else if (eth.h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return;
		__builtin_memcpy(ev->saddr, &ip6.saddr, 16);
		__builtin_memcpy(ev->daddr, &ip6.daddr, 16);
		ev->l4proto = ip6.nexthdr;
		l4off = ETH_HLEN + sizeof(ip6);
	} else if (eth.h_proto == bpf_htons(ETH_P_ARP)) {
		struct {
			__be16 op;
			__u8 sha[6];
			__be32 sip;
			__u8 tha[6];
			__be32 tip;
		} __attribute__((packed)) arp;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &arp, sizeof(arp)) < 0)
			return;
		ev->arp_op = bpf_ntohs(arp.op);
		__builtin_memcpy(ev->saddr, &arp.sip, 4);
		__builtin_memcpy(ev->daddr, &arp.tip, 4);
		return;
	} else {
		return;
	}

	if (ev->l4proto == IPPROTO_TCP || ev->l4proto == IPPROTO_UDP) {
		__be16 ports[2];

		if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)) == 0) {
			ev->sport = bpf_ntohs(ports[0]);
			ev->dport = bpf_ntohs(ports[1]);
		}
	} else if (ev->l4proto == IPPROTO_ICMP || ev->l4proto == IPPROTO_ICMPV6) {
		__u8 tc[2];

		if (bpf_skb_load_bytes(skb, l4off, tc, sizeof(tc)) == 0) {
			ev->sport = tc[0];
			ev->dport = tc[1];
		}
	}
}

/* The event is written in place in the ring (no copy through the stack, which the pipeline's
 * inlined stages need for themselves). */
static __always_inline void cg_notify(struct __sk_buff *skb, const struct cg_ctx *ctx, __u8 type, __u8 reason)
{
	struct cg_event *ev = cg_events.ringbuf_reserve(sizeof(struct cg_event));

	if (!ev) {
		cg_count(skb, CG_OK_EVENT_LOST, ctx->dir); /* counted, so a lost event is never silent */
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->type = type;
	ev->reason = reason;
	ev->dir = ctx->dir;
	ev->ifindex = skb->ifindex;
	ev->len = skb->len;
	ev->src_identity = ctx->src_identity;
	ev->dst_identity = ctx->dst_identity;
	ev->rule = ctx->rule;
	ev->ct_state = ctx->ct_state;
	ev->side = ctx->side;
	cg_event_describe(skb, ev);
	cg_events.ringbuf_submit(ev, 0);
}

/* The direction a drop is counted in: a policy decision's by the side whose policy decided
 * (ingress of the receiver, egress of the sender), wherever the packet was; others by the hook. */
static __always_inline __u8 cg_drop_dir(const struct cg_ctx *ctx, __u8 reason)
{
	if (reason == DROP_POLICY || reason == DROP_POLICY_DENY || reason == DROP_FRAG || reason == DROP_PROXY_REQUIRED)
		return ctx->side ? CG_DIR_FROM_EP : CG_DIR_TO_EP;
	return ctx->dir;
}

static __always_inline int cg_drop(struct __sk_buff *skb, const struct cg_ctx *ctx, __u8 reason)
{
	cg_count(skb, reason, cg_drop_dir(ctx, reason));
	cg_notify(skb, ctx, CG_EVENT_DROP, reason);
	return TC_ACT_SHOT;
}

/* Verdict events of allowed new flows cost the agent a decode each (10k/s under a connection
 * storm); the agent sets CG_CFG_QUIET while no monitor asks for them. Denials always report. */
static __always_inline int cg_verdicts_wanted(const struct cg_ctx *ctx)
{
	return !(ctx->cfg_flags & CG_CFG_QUIET);
}

/* A packet forwarded with verdict `code`; reported only while tracing is on. */
static __always_inline void cg_forwarded(struct __sk_buff *skb, const struct cg_ctx *ctx, __u8 code)
{
	cg_count(skb, code, ctx->dir);
	if (ctx->cfg_flags & CG_CFG_TRACE)
		cg_notify(skb, ctx, CG_EVENT_TRACE, code);
}

/* A packet translated by a service: forwarded, and its new flow reported while verdicts are wanted. */
static __always_inline void cg_translated(struct __sk_buff *skb, const struct cg_ctx *ctx, __u8 code, int is_new)
{
	cg_forwarded(skb, ctx, code);
	if (is_new && cg_verdicts_wanted(ctx))
		cg_notify(skb, ctx, CG_EVENT_VERDICT, code);
}

/* Consumed on purpose (housekeeping frames): counted, no event. */
static __always_inline int cg_quiet(struct __sk_buff *skb)
{
	cg_count(skb, CG_OK_QUIET, 0);
	return TC_ACT_SHOT;
}
