/* SPDX-License-Identifier: Apache-2.0 */
/* The per-packet context: what a program learned about a packet on its way to a verdict
 * (identities, conntrack state, deciding rule), and the cg_config facts read once per packet.
 * Every stage takes it; events report it (lib/events.h).
 */
#pragma once

#include "lib/common.h"
#include "lib/maps.h"

/* What a program learned about a packet on its way to a verdict; reported with it. */
struct cg_ctx {
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule;
	__u32 cfg_flags;    /* cg_config.flags, read once per packet (cg_ctx_init) */
	__u32 policy_rev;   /* cg_config.policy_rev, likewise */
	__u32 tunnel_ifindex; /* cg_config.tunnel_ifindex, likewise */
	__be32 dst_node;    /* the node hosting a non-local receiver (its ipcache entry's tunnel endpoint), or 0 */
	__u8  ct_state;
	__u8  side;         /* 1 = the sender's egress decided, 0 = the receiver's ingress */
	__u8  dir;          /* CG_DIR_* */
	__u8  proxy;        /* 1 = the flow goes through the L7 proxy (lib/proxy.h) */
	__u16 proxy_port;   /* cg_config.proxy_port, likewise */
	__u8  from_proxy;   /* sent by the proxy's upstream socket: src_identity came in its mark */
	__u8  pad;
};

/* A packet's context, with what it needs of cg_config read once, before any policy lookup:
 * the agent bumps policy_rev after its map writes, so a verdict decided while they were
 * under way is cached with the older number and decided again on the flow's next packet. */
static __always_inline void cg_ctx_init(struct cg_ctx *ctx, __u8 dir)
{
	__u32 zero = 0;
	struct cg_config *cfg = cg_config.lookup(&zero);

	ctx->dir = dir;
	ctx->cfg_flags = cfg ? cfg->flags : 0;
	ctx->policy_rev = cfg ? cfg->policy_rev : 0;
	ctx->tunnel_ifindex = cfg ? cfg->tunnel_ifindex : 0;
	ctx->proxy_port = cfg ? cfg->proxy_port : 0;
}
