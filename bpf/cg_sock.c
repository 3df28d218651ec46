/* SPDX-License-Identifier: Apache-2.0 */
/* Socket-level load balancing: cgroup sock_addr programs on the cgroup2 root.
 *
 *   connect4/6   connect() to a VIP: the destination becomes a backend, once per connection
 *   sendmsg4/6   sendto() to a VIP on an unconnected UDP socket: likewise, per datagram,
 *                keeping the socket's backend while it lasts
 *   recvmsg4/6   a datagram from a backend the socket reached through a VIP reads as from the VIP
 *   getpeername4/6  likewise for the peer of a connected socket
 *
 * Only sockets of the network namespaces this agent serves are translated (cg_lb_netns): its
 * own and its endpoints'. Packets then leave with the backend's address, and routing, the
 * overlay and policy (on the backend's identity) apply unchanged. A VIP without backends is
 * refused at once (ECONNREFUSED), never a silent black hole.
 */
#include "lib/common.h"
#include "lib/lb.h"

#define CG_SYS_PROCEED 1
#define CG_SYS_REJECT  0
#define CG_ECONNREFUSED 111

static __always_inline int cg_sock_served(void *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);

	return cg_lb_netns.lookup(&cookie) != NULL;
}

static __always_inline void cg_sock_key(struct cg_lb_sock_key *sk, __u64 cookie, __u8 family, const __u8 *addr,
					__be16 port, __u8 dir)
{
	__builtin_memset(sk, 0, sizeof(*sk));
	sk->cookie = cookie;
	sk->family = family;
	sk->port = port;
	sk->dir = dir;
	__builtin_memcpy(sk->addr, addr, 16);
}

/* Translate (addr, port) in place if it is a VIP: 1 translated, 0 not a service, -1 refuse. */
static __always_inline int cg_sock_forward(void *ctx, __u8 family, __u8 proto, __u8 *addr, __be16 *port,
					   int affinity)
{
	struct cg_lb_sock_value fwd = {}, rev = {};
	struct cg_lb_sock_key sk;
	struct cg_lb_value *svc, *be = NULL;
	struct cg_lb_key k;
	__u64 cookie;
	__u16 slot = 0;

	cg_lb_key_init(&k, family, addr, *port, proto);
	svc = cg_lb_service(&k);
	if (!svc)
		return 0;
	if (!svc->count)
		return -1;
	cookie = bpf_get_socket_cookie(ctx);
	cg_sock_key(&sk, cookie, family, addr, *port, 1);
	if (affinity) {
		struct cg_lb_sock_value *seen = cg_lb_sock.lookup(&sk);

		if (seen && seen->slot && seen->slot <= svc->count) {
			be = cg_lb_backend(&k, seen->slot);
			if (be && be->port == seen->port && cg_ip6_eq(be->addr, seen->addr))
				slot = seen->slot;
		}
	}
	if (!slot) {
		slot = cg_lb_pick(svc);
		be = cg_lb_backend(&k, slot);
	}
	if (!be)
		return -1; /* the service shrank under us: refuse rather than guess */
	if (affinity) {
		__builtin_memcpy(fwd.addr, be->addr, 16);
		fwd.port = be->port;
		fwd.slot = slot;
		cg_lb_sock.update(&sk, &fwd);
	}
	__builtin_memcpy(rev.addr, addr, 16);
	rev.port = *port;
	cg_sock_key(&sk, cookie, family, be->addr, be->port, 0);
	cg_lb_sock.update(&sk, &rev);
	__builtin_memcpy(addr, be->addr, 16);
	*port = be->port;
	return 1;
}

/* Rewrite a backend (addr, port) this socket reached through a VIP back to the VIP. */
static __always_inline int cg_sock_reverse(void *ctx, __u8 family, __u8 *addr, __be16 *port)
{
	struct cg_lb_sock_value *rev;
	struct cg_lb_sock_key sk;

	cg_sock_key(&sk, bpf_get_socket_cookie(ctx), family, addr, *port, 0);
	rev = cg_lb_sock.lookup(&sk);
	if (!rev)
		return 0;
	__builtin_memcpy(addr, rev->addr, 16);
	*port = rev->port;
	return 1;
}

static __always_inline int cg_sock4_forward(struct bpf_sock_addr *ctx, int affinity)
{
	__u8 addr[16] = {};
	__be16 port = (__be16)ctx->user_port;
	__u32 ip = ctx->user_ip4;
	int ret;

	if (!cg_sock_served(ctx))
		return CG_SYS_PROCEED;
	__builtin_memcpy(addr, &ip, 4);
	ret = cg_sock_forward(ctx, 4, (__u8)ctx->protocol, addr, &port, affinity);
	if (ret < 0) {
		bpf_set_retval(-CG_ECONNREFUSED);
		return CG_SYS_REJECT;
	}
	if (ret > 0) {
		__builtin_memcpy(&ip, addr, 4);
		ctx->user_ip4 = ip;
		ctx->user_port = (__u32)port;
	}
	return CG_SYS_PROCEED;
}

static __always_inline int cg_sock6_forward(struct bpf_sock_addr *ctx, int affinity)
{
	__u32 ip[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	__be16 port = (__be16)ctx->user_port;
	int ret;

	if (!cg_sock_served(ctx))
		return CG_SYS_PROCEED;
	ret = cg_sock_forward(ctx, 6, (__u8)ctx->protocol, (__u8 *)ip, &port, affinity);
	if (ret < 0) {
		bpf_set_retval(-CG_ECONNREFUSED);
		return CG_SYS_REJECT;
	}
	if (ret > 0) {
		ctx->user_ip6[0] = ip[0];
		ctx->user_ip6[1] = ip[1];
		ctx->user_ip6[2] = ip[2];
		ctx->user_ip6[3] = ip[3];
		ctx->user_port = (__u32)port;
	}
	return CG_SYS_PROCEED;
}

static __always_inline int cg_sock4_reverse(struct bpf_sock_addr *ctx)
{
	__u8 addr[16] = {};
	__be16 port = (__be16)ctx->user_port;
	__u32 ip = ctx->user_ip4;

	__builtin_memcpy(addr, &ip, 4);
	if (cg_sock_reverse(ctx, 4, addr, &port)) {
		__builtin_memcpy(&ip, addr, 4);
		ctx->user_ip4 = ip;
		ctx->user_port = (__u32)port;
	}
	return CG_SYS_PROCEED;
}

static __always_inline int cg_sock6_reverse(struct bpf_sock_addr *ctx)
{
	__u32 ip[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	__be16 port = (__be16)ctx->user_port;

	if (cg_sock_reverse(ctx, 6, (__u8 *)ip, &port)) {
		ctx->user_ip6[0] = ip[0];
		ctx->user_ip6[1] = ip[1];
		ctx->user_ip6[2] = ip[2];
		ctx->user_ip6[3] = ip[3];
		ctx->user_port = (__u32)port;
	}
	return CG_SYS_PROCEED;
}

int cg_sock_connect4(struct bpf_sock_addr *ctx)     { return cg_sock4_forward(ctx, 0); }
int cg_sock_sendmsg4(struct bpf_sock_addr *ctx)     { return cg_sock4_forward(ctx, 1); }
int cg_sock_recvmsg4(struct bpf_sock_addr *ctx)     { return cg_sock4_reverse(ctx); }
int cg_sock_peer4(struct bpf_sock_addr *ctx)        { return cg_sock4_reverse(ctx); }
int cg_sock_connect6(struct bpf_sock_addr *ctx)     { return cg_sock6_forward(ctx, 0); }
int cg_sock_sendmsg6(struct bpf_sock_addr *ctx)     { return cg_sock6_forward(ctx, 1); }
int cg_sock_recvmsg6(struct bpf_sock_addr *ctx)     { return cg_sock6_reverse(ctx); }
int cg_sock_peer6(struct bpf_sock_addr *ctx)        { return cg_sock6_reverse(ctx); }
