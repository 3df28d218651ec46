/* SPDX-License-Identifier: Apache-2.0 */
/* Transparent redirect to the L7 proxy (plugin/proxy), in tc ingress: a flow whose deciding
 * policy entry carries an L7 filter is handed to the proxy's socket with bpf_sk_assign, and
 * marked CG_MARK_TO_PROXY so that the fwmark rule routes it to the local table (the agent's
 * datapath/kernel/proxyroute.py). The proxy's IP_TRANSPARENT listener accepts it with the original
 * destination as its own address; later packets go to the established socket. Fail closed: no
 * listener, or a refused assign, drops the packet with a named reason; never passes it on.
 *
 * The proxy's upstream sockets carry CG_MARK_FROM_PROXY with the sender's identity in the other
 * bits; cg_mark_identity() reads it back where those packets meet policy again (lib/pipeline.h).
 */
#pragma once

#include "lib/common.h"
#include "lib/ctx.h"
#include "lib/events.h"
#include "lib/l4.h"

#define CG_TCP_LISTEN    10
#define CG_TCP_TIME_WAIT 6

/* The identity a FROM_PROXY mark carries: bits 0-7 and 12-31 (bits 8-11 are the magic). */
static __always_inline __u32 cg_mark_identity(__u32 mark)
{
	return ((mark >> 12) << 8) | (mark & 0xff);
}

static __always_inline int cg_from_proxy(const struct __sk_buff *skb)
{
	return (skb->mark & CG_MARK_MASK) == CG_MARK_FROM_PROXY;
}

static __always_inline struct bpf_sock *cg_proxy_socket(struct __sk_buff *skb, const struct cg_flow *f,
							__u16 proxy_port)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	__u32 size;

	if (f->family == 4) {
		__builtin_memcpy(&tuple.ipv4.saddr, f->saddr, 4);
		__builtin_memcpy(&tuple.ipv4.daddr, f->daddr, 4);
		tuple.ipv4.sport = f->sport;
		tuple.ipv4.dport = f->dport;
		size = sizeof(tuple.ipv4);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, f->saddr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, f->daddr, 16);
		tuple.ipv6.sport = f->sport;
		tuple.ipv6.dport = f->dport;
		size = sizeof(tuple.ipv6);
	}
	/* An established connection of this flow first (the proxy accepted it already). */
	sk = bpf_skc_lookup_tcp(skb, &tuple, size, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != CG_TCP_LISTEN && sk->state != CG_TCP_TIME_WAIT)
			return sk;
		bpf_sk_release(sk);
	}
	/* Else the listener: 127.0.0.1 or ::1, the proxy port. */
	__builtin_memset(&tuple, 0, sizeof(tuple));
	if (f->family == 4) {
		tuple.ipv4.daddr = bpf_htonl(0x7f000001);
		tuple.ipv4.dport = bpf_htons(proxy_port);
	} else {
		tuple.ipv6.daddr[3] = bpf_htonl(1);
		tuple.ipv6.dport = bpf_htons(proxy_port);
	}
	return bpf_skc_lookup_tcp(skb, &tuple, size, BPF_F_CURRENT_NETNS, 0);
}

/* Hand the packet to the proxy. A tc action, or -DROP_*. */
static __always_inline int cg_redirect_proxy(struct __sk_buff *skb, const struct cg_ctx *ctx, const struct cg_flow *f)
{
	struct bpf_sock *sk;
	long ret;

	if (!ctx->proxy_port || f->ct_proto != IPPROTO_TCP || f->frag)
		return -DROP_PROXY_LOOKUP;
	sk = cg_proxy_socket(skb, f, ctx->proxy_port);
	if (!sk)
		return -DROP_PROXY_LOOKUP;
	ret = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (ret != 0)
		return -DROP_PROXY_ASSIGN;
	skb->mark = CG_MARK_TO_PROXY;
	bpf_skb_change_type(skb, 0);      /* PACKET_HOST: the stack delivers it, whatever the MAC */
	cg_forwarded(skb, ctx, CG_OK_PROXY);
	return TC_ACT_OK;
}
