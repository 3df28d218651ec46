/* SPDX-License-Identifier: Apache-2.0 */
/* Local delivery: hand a packet straight to another endpoint on this host. */
#pragma once

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/events.h"

static __always_inline struct cg_endpoint *cg_lookup_ip(__u8 family, const void *addr)
{
	struct cg_ip_key key = {};

	key.family = family;
	if (family == 4)
		__builtin_memcpy(key.addr, addr, 4);
	else
		__builtin_memcpy(key.addr, addr, 16);
	return cg_ips.lookup(&key);
}

/* A container attached to several networks may answer on one interface with the
 * address of another; that is its own address, not a spoof. */
static __always_inline int cg_sandbox_owns(const struct cg_endpoint *ep, __u8 family,
					   const void *addr)
{
	struct cg_endpoint *other;

	if (!ep->sandbox)
		return 0;
	other = cg_lookup_ip(family, addr);
	return other && other->sandbox == ep->sandbox;
}

/* Move a rewritten packet into the peer's network namespace without a second trip through a
 * host veth. */
static __always_inline int cg_redirect_local(struct __sk_buff *skb, const struct cg_ctx *ctx,
					     const struct cg_endpoint *dst)
{
	cg_forwarded(skb, ctx, CG_OK_LOCAL);
	return bpf_redirect_peer(dst->ifindex, 0);
}

/* Rewrite the MACs as the gateway would and move the packet into the peer's
 * network namespace without a second trip through a host veth. */
static __always_inline int cg_deliver_local(struct __sk_buff *skb, const struct cg_ctx *ctx,
					    const struct cg_endpoint *dst)
{
	struct {
		__u8 dmac[6];
		__u8 smac[6];
	} macs;

	cg_mac_copy(macs.dmac, dst->mac);
	cg_mac_copy(macs.smac, dst->host_mac);
	if (bpf_skb_store_bytes(skb, 0, &macs, sizeof(macs), 0) < 0)
		return -DROP_INVALID;
	return cg_redirect_local(skb, ctx, dst);
}
