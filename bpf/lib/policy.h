/* SPDX-License-Identifier: Apache-2.0 */
/* Identity-based policy: what the subject allows (who the peer is: lib/identity.h).
 *
 * decide() looks up the peer's own identity and the wildcard identity 0 in the LPM
 * policy map; a deny from either wins, then an allow from either; no entry is a deny.
 * An exact-match hash in front holds that verdict for single-port entries of one peer.
 * datapath/policy/compile.py decide() is the same algorithm, which `policy trace` uses.
 */
#pragma once

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/events.h"
#include "lib/conntrack.h"
#include "lib/ctx.h"
#include "lib/identity.h"

/* The full-length key of a packet: the trie finds its longest match, the exact hash itself. */
static __always_inline void cg_policy_key_of(struct cg_policy_key *key, __u32 subject, __u32 peer, __u8 egress,
					     __u8 proto, __be16 port)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->prefixlen = 96;
	key->subject = subject;
	key->peer = peer;
	key->egress = egress;
	key->proto = proto;
	key->dport = port;
}

static __always_inline struct cg_policy_value *cg_policy_lpm(__u32 subject, __u32 peer, __u8 egress,
							     __u8 proto, __be16 port)
{
	struct cg_policy_key key;

	cg_policy_key_of(&key, subject, peer, egress, proto, port);
	return cg_policy.lookup(&key);
}

/* 0 if allowed, else -DROP_POLICY or -DROP_POLICY_DENY; *rule names the deciding rule.
 * An exact entry for this peer, protocol and port holds the verdict already (cg_policy_exact);
 * without one, both peers' longest matches in the trie decide. */
static __always_inline int cg_policy_decide(__u32 subject, __u8 egress, __u32 peer, const struct cg_flow *f,
					    __u32 *rule, __u16 *l7)
{
	struct cg_policy_value *specific = NULL, *wildcard;
	__be16 port = f->frag ? 0 : f->policy_port;

	if (peer != CG_ID_ANY) {
		struct cg_policy_key key;

		cg_policy_key_of(&key, subject, peer, egress, f->proto, port);
		specific = cg_policy_exact.lookup(&key);
		if (specific) {
			*rule = specific->rule;
			if (specific->deny)
				return -DROP_POLICY_DENY;
			*l7 = specific->l7;
			return 0;
		}
		specific = cg_policy_lpm(subject, peer, egress, f->proto, port);
	}
	wildcard = cg_policy_lpm(subject, CG_ID_ANY, egress, f->proto, port);
	if (specific && specific->deny) {
		*rule = specific->rule;
		return -DROP_POLICY_DENY;
	}
	if (wildcard && wildcard->deny) {
		*rule = wildcard->rule;
		return -DROP_POLICY_DENY;
	}
	if (specific) {
		*rule = specific->rule;
		*l7 = specific->l7;
		return 0;
	}
	if (wildcard) {
		*rule = wildcard->rule;
		*l7 = wildcard->l7;
		return 0;
	}
	*rule = 0;
	return -DROP_POLICY;
}

/* Whether an established flow's cached allow verdict still holds for this packet: the
 * policy map has not changed since, both parties keep the identities it was decided for,
 * and it covered every side this packet needs. */
static __always_inline int cg_ct_verdict_holds(const struct cg_ct_value *ct, const struct cg_ctx *ctx,
					       __u8 sides)
{
	__u32 rev = ctx->policy_rev;

	return rev && ct->policy_rev == rev && (ct->policy_sides & sides) == sides &&
	       ct->src_identity == ctx->src_identity && ct->dst_identity == ctx->dst_identity;
}

/* Conntrack plus both sides of policy for one packet.
 *
 * `src_subject` / `dst_subject` say whether the sender's egress and the receiver's
 * ingress apply (only local endpoints have policy). Replies and related ICMP of a
 * tracked flow pass. A new flow is decided in the policy map; an established one reuses
 * the verdict cached in its conntrack entry while that holds (cg_ct_verdict_holds) and is
 * decided again otherwise, so a revoked rule stops a live flow on its next packet (and
 * forgets it).
 *
 * L7: when a deciding allow entry carries an L7 filter, the flow goes to the proxy
 * (ctx->proxy; the caller redirects or, where it cannot, drops) unless the proxy itself sent it.
 * Its conntrack entry says so (CG_CT_F_PROXY) for the flow's whole life, with both sides'
 * filters, which the proxy reads per request: a policy change applies to the next request.
 */
static __always_inline int cg_policy_flow(struct __sk_buff *skb, struct cg_ctx *ctx, const struct cg_flow *f,
					  int src_subject, int dst_subject)
{
	struct cg_ct_value *ct;
	__u8 sides = (src_subject ? CG_CT_SIDE_EGRESS : 0) | (dst_subject ? CG_CT_SIDE_INGRESS : 0);
	__u32 rule = 0;
	__u16 l7_egress = 0, l7_ingress = 0;
	int state, ret = 0, proxy;

	state = cg_ct_lookup(f, &ct, skb);
	ctx->ct_state = state;
	if (state == CG_CT_REPLY || state == CG_CT_RELATED)
		return 0;
	if (state == CG_CT_ESTABLISHED && ct && cg_ct_verdict_holds(ct, ctx, sides)) {
		ctx->rule = ct->rule;
		ctx->proxy = (ct->flags & CG_CT_F_PROXY) ? 1 : 0;
		return 0;
	}
	if (src_subject) {
		ret = cg_policy_decide(ctx->src_identity, 1, ctx->dst_identity, f, &rule, &l7_egress);
		ctx->side = 1;
	}
	if (ret == 0 && dst_subject) {
		__u32 ingress_rule = 0;

		ret = cg_policy_decide(ctx->dst_identity, 0, ctx->src_identity, f, &ingress_rule, &l7_ingress);
		if (ret < 0 || !src_subject || !rule) {
			rule = ingress_rule;
			ctx->side = 0;
		}
	}
	ctx->rule = rule;
	if (ret < 0) {
		if (f->frag && ret == -DROP_POLICY)
			ret = -DROP_FRAG;
		if (state == CG_CT_ESTABLISHED)
			cg_ct_delete(f);
		else
			cg_notify(skb, ctx, CG_EVENT_VERDICT, -ret);
		return ret;
	}
	proxy = (l7_egress || l7_ingress) && !ctx->from_proxy;
	if (proxy && f->frag)
		return -DROP_PROXY_REQUIRED;
	if (state == CG_CT_ESTABLISHED && ct) {
		if (proxy && !(ct->flags & CG_CT_F_PROXY)) {
			/* A live direct flow that now needs L7: it cannot move into the proxy mid-stream. */
			cg_ct_delete(f);
			return -DROP_PROXY_REQUIRED;
		}
		ctx->proxy = (ct->flags & CG_CT_F_PROXY) ? 1 : 0;
		ct->l7_egress = l7_egress;
		ct->l7_ingress = l7_ingress;
		/* Allowed again, under the current policy and identities: cache that. */
		ct->src_identity = ctx->src_identity;
		ct->dst_identity = ctx->dst_identity;
		ct->rule = rule;
		ct->policy_sides = sides;
		ct->policy_rev = ctx->policy_rev;
	}
	if (state == CG_CT_NEW) {
		ctx->proxy = proxy;
		ret = cg_ct_create(f, skb, ctx, rule, sides, l7_egress, l7_ingress, ct);
		if (ret < 0)
			return ret;
		if (!f->frag && cg_verdicts_wanted(ctx))  /* allowed, and whether to the proxy */
			cg_notify(skb, ctx, CG_EVENT_VERDICT, proxy ? CG_OK_PROXY : CG_OK_POLICY);
	}
	return 0;
}
