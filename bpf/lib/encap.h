/* SPDX-License-Identifier: Apache-2.0 */
/* VXLAN encapsulation: a packet for an address another node hosts (its ipcache entry names the
 * node as tunnel endpoint) leaves through the instance's collect-metadata VXLAN device, with
 * the sender's security identity as the VNI and the node's address as the outer destination.
 * The receiver (cg_overlay.c) takes the identity from the VNI instead of looking it up.
 */
#pragma once

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/ctx.h"
#include "lib/events.h"
#include "lib/identity.h"

#define CG_NO_ENCAP    0x7fffffff   /* not for the tunnel: the caller goes on */
#define CG_TUNNEL_TTL  64

/* Set the tunnel metadata for `identity` towards `node` (network byte order). 0, or -DROP_*. */
static __always_inline int cg_set_tunnel(struct __sk_buff *skb, __u32 identity, __be32 node)
{
	struct bpf_tunnel_key key = {};

	if (identity > CG_TUNNEL_MAX_ID)
		return -DROP_NO_CLUSTER_IDENTITY;           /* fail closed: it would arrive as another */
	key.tunnel_id = identity;
	key.remote_ipv4 = bpf_ntohl(node);
	key.tunnel_ttl = CG_TUNNEL_TTL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return -DROP_INVALID;
	return 0;
}

/* After the sender's egress policy allowed a packet that no local endpoint takes: into the
 * tunnel if a node hosts the receiver (ctx->dst_node, from the ipcache entry that gave its
 * identity: the same entry decides policy and path), else CG_NO_ENCAP. A tc action, or -DROP_*. */
static __always_inline int cg_stage_encap(struct __sk_buff *skb, const struct cg_ctx *ctx)
{
	int ret;

	if (!ctx->dst_node)
		return CG_NO_ENCAP;
	ret = cg_set_tunnel(skb, ctx->src_identity, ctx->dst_node);
	if (ret < 0)
		return ret;
	cg_forwarded(skb, ctx, CG_OK_TUNNEL);
	return bpf_redirect(ctx->tunnel_ifindex, 0);
}
