/* SPDX-License-Identifier: Apache-2.0 */
/* Stateful connection tracking shared by every endpoint.
 *
 * An entry is keyed by the tuple of a flow's first packet. A packet whose reversed tuple
 * has an entry is a REPLY; an ICMP error quoting a tracked flow is RELATED; a packet whose
 * own tuple has an entry is ESTABLISHED; anything else is NEW. Lifetimes follow the
 * protocol (TCP: SYN, established, closing); the agent deletes expired entries.
 */
#pragma once

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/l4.h"
#include "lib/ctx.h"

#define CG_SEC 1000000000ULL
#define CG_TCP_TIMEOUT   (21600 * CG_SEC)
#define CG_SYN_TIMEOUT   (60 * CG_SEC)
#define CG_CLOSE_TIMEOUT (10 * CG_SEC)
#define CG_OTHER_TIMEOUT (60 * CG_SEC)

/* Conntrack's clock: CLOCK_MONOTONIC at tick resolution, a fraction of bpf_ktime_get_ns()'s
 * cost per packet (Cilium keeps conntrack in jiffies for the same reason). Deadlines are
 * seconds; a tick late is nothing. */
static __always_inline __u64 cg_ct_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

static __always_inline void cg_ct_key(struct cg_ct_key *k, const struct cg_flow *f, int reverse)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (reverse) {
		__builtin_memcpy(k->saddr, f->daddr, 16);
		__builtin_memcpy(k->daddr, f->saddr, 16);
		k->sport = f->dport;
		k->dport = f->sport;
	} else {
		__builtin_memcpy(k->saddr, f->saddr, 16);
		__builtin_memcpy(k->daddr, f->daddr, 16);
		k->sport = f->sport;
		k->dport = f->dport;
	}
	k->proto = f->ct_proto;
	k->family = f->family;
}

static __always_inline __u64 cg_ct_lifetime(const struct cg_ct_value *ct, __u8 proto)
{
	__u32 zero = 0;
	struct cg_config *cfg = cg_config.lookup(&zero);
	__u64 t;

	if (proto != IPPROTO_TCP) {
		t = cfg ? cfg->other_timeout_ns : 0;
		return t ? t : CG_OTHER_TIMEOUT;
	}
	if ((ct->flags & CG_CT_F_RST) || ((ct->flags & CG_CT_F_FIN_FWD) && (ct->flags & CG_CT_F_FIN_REV))) {
		t = cfg ? cfg->close_timeout_ns : 0;
		return t ? t : CG_CLOSE_TIMEOUT;
	}
	if (ct->flags & CG_CT_F_REPLIED) {
		t = cfg ? cfg->tcp_timeout_ns : 0;
		return t ? t : CG_TCP_TIMEOUT;
	}
	t = cfg ? cfg->syn_timeout_ns : 0;
	return t ? t : CG_SYN_TIMEOUT;
}

/* Account a packet to its entry and push the deadline out. */
static __always_inline void cg_ct_touch(struct cg_ct_value *ct, const struct cg_flow *f,
					struct __sk_buff *skb, int reply, __u64 now)
{
	__u8 flags = ct->flags;

	if (reply)
		flags |= CG_CT_F_REPLIED;
	if (f->tcp_flags & CG_TCP_F_RST)
		flags |= CG_CT_F_RST;
	if (f->tcp_flags & CG_TCP_F_FIN)
		flags |= reply ? CG_CT_F_FIN_REV : CG_CT_F_FIN_FWD;
	if (flags != ct->flags)
		ct->flags = flags;
	ct->expires = now + cg_ct_lifetime(ct, f->ct_proto);
	__sync_fetch_and_add(&ct->packets, 1);
	__sync_fetch_and_add(&ct->bytes, skb->len);
}

/* The flow's state; `entry` is set for REPLY, RELATED and ESTABLISHED, and for NEW when the
 * flow's own tuple still has an expired entry, which cg_ct_create then reuses in place. */
static __always_inline int cg_ct_lookup(const struct cg_flow *f, struct cg_ct_value **entry,
					struct __sk_buff *skb)
{
	struct cg_ct_key key;
	struct cg_ct_value *ct;
	__u64 now = cg_ct_now();

	*entry = NULL;
	if (f->frag)
		return CG_CT_NEW;            /* no ports: policy alone decides */
	cg_ct_key(&key, f, 1);
	ct = cg_ct.lookup(&key);
	if (ct && ct->expires > now) {
		*entry = ct;
		if (f->related)
			return CG_CT_RELATED;
		cg_ct_touch(ct, f, skb, 1, now);
		return CG_CT_REPLY;
	}
	cg_ct_key(&key, f, 0);
	ct = cg_ct.lookup(&key);
	if (!ct)
		return CG_CT_NEW;
	*entry = ct;
	if (ct->expires <= now)
		return CG_CT_NEW;
	if (f->related)
		return CG_CT_RELATED;
	cg_ct_touch(ct, f, skb, 0, now);
	return CG_CT_ESTABLISHED;
}

/* A new flow's entry: its parties (ctx), the deciding rule, the sides whose verdict is cached,
 * and, for a flow through the proxy (ctx->proxy), both sides' L7 filters. `stale` is the
 * tuple's expired entry (cg_ct_lookup), overwritten in place: a map update costs more
 * than the whole rest of a new flow's conntrack work. */
static __always_inline int cg_ct_create(const struct cg_flow *f, struct __sk_buff *skb, const struct cg_ctx *ctx,
					__u32 rule, __u8 policy_sides, __u16 l7_egress, __u16 l7_ingress,
					struct cg_ct_value *stale)
{
	struct cg_ct_key key;
	struct cg_ct_value ct = {};
	__u64 now = cg_ct_now();

	if (f->frag || f->related)
		return 0;                 /* nothing to track: no ports, or an error about no flow */
	cg_ct_key(&key, f, 0);
	ct.src_identity = ctx->src_identity;
	ct.dst_identity = ctx->dst_identity;
	ct.rule = rule;
	ct.policy_rev = ctx->policy_rev;
	ct.policy_sides = policy_sides;
	if (ctx->proxy) {
		ct.flags |= CG_CT_F_PROXY;
		ct.l7_egress = l7_egress;
		ct.l7_ingress = l7_ingress;
	}
	ct.packets = 1;
	ct.bytes = skb->len;
	if (f->tcp_flags & CG_TCP_F_RST)
		ct.flags |= CG_CT_F_RST;
	ct.expires = now + cg_ct_lifetime(&ct, f->ct_proto);
	if (stale) {
		*stale = ct;
		return 0;
	}
	if (cg_ct.update(&key, &ct) < 0)
		return -DROP_CT_CREATE;
	return 0;
}

static __always_inline void cg_ct_delete(const struct cg_flow *f)
{
	struct cg_ct_key key;

	cg_ct_key(&key, f, 0);
	cg_ct.delete(&key);
}
