/* SPDX-License-Identifier: Apache-2.0 */
/* Load balancing: the service maps and the backend choice both paths share.
 *
 * A service is one hash map, slot 0 its entry (how many backends, its reverse-NAT index),
 * slots 1..count its backends, so a service changes without touching any other: the agent
 * writes new backend slots before a larger count, and a smaller count before it deletes
 * slots (datapath/kernel/lb.py). Layouts are mirrored in datapath/kernel/layout.py.
 *
 * The socket programs (cg_sock.c) rewrite the destination once per connect()/sendmsg() for
 * the network namespaces this agent serves (its own and its endpoints', cg_lb_netns); the tc
 * program on the node's devices (cg_netdev.c) translates packets that arrive for a VIP.
 */
#pragma once

#include "lib/common.h"

#ifndef CG_LB_MAX_SERVICES
#define CG_LB_MAX_SERVICES 65536
#endif
#ifndef CG_LB_MAX_BACKENDS
#define CG_LB_MAX_BACKENDS 262144
#endif
#ifndef CG_LB_SOCK_MAX
#define CG_LB_SOCK_MAX 262144
#endif
#ifndef CG_LB_CT_MAX
#define CG_LB_CT_MAX 131072
#endif

#define CG_LB_F_DSR 0x1 /* slot 0: remote backends of packet-level flows answer the client directly */

struct cg_lb_key {
	__u8   addr[16];    /* VIP; IPv4 in the first four bytes */
	__be16 port;        /* VIP port */
	__u8   proto;       /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   family;      /* 4 or 6 */
	__u16  slot;        /* 0 = the service; 1..count = its backends */
	__u16  pad;
};

struct cg_lb_value {
	__u8   addr[16];    /* slot > 0: the backend's address */
	__be16 port;        /* slot > 0: the backend's port */
	__u16  count;       /* slot 0: how many backends (0 = none: refused) */
	__u16  rev_nat;     /* the service's index in cg_lb_revnat */
	__u16  flags;       /* slot 0: CG_LB_F_* */
};

/* rev_nat index -> the frontend, to translate replies back. */
struct cg_lb_revnat {
	__u8   addr[16];
	__be16 port;
	__u8   family;
	__u8   pad;
};

/* The socket programs' memory: a socket's translations, by cookie and backend (recvmsg and
 * getpeername answer with the VIP), and by cookie and VIP (an unconnected UDP socket keeps
 * its backend while the backend lasts). */
struct cg_lb_sock_key {
	__u64  cookie;
	__u8   addr[16];
	__be16 port;
	__u8   family;
	__u8   dir;         /* 0: key addr is the backend (reverse); 1: key addr is the VIP (affinity) */
	__u32  pad;
};

struct cg_lb_sock_value {
	__u8   addr[16];    /* reverse: the VIP; affinity: the backend */
	__be16 port;
	__u16  slot;        /* affinity: the backend's slot, checked again before reuse */
	__u32  pad;
};

/* Packet-level flows (cg_netdev.c): the client's tuple towards the VIP -> the backend chosen
 * for it; and, on the backend's node, the backend's reply tuple -> the VIP it answers as. */
struct cg_lb_flow_key {
	__u8   saddr[16];
	__u8   daddr[16];
	__be16 sport;
	__be16 dport;
	__u8   proto;
	__u8   family;
	__u8   pad[2];
};

struct cg_lb_flow_value {
	__u8   addr[16];    /* the backend (LB node), or the VIP (DSR at the backend's node) */
	__be16 port;
	__u16  slot;
	__u16  rev_nat;
	__u16  pad;
	__u64  expires;     /* bpf_ktime_get_ns() deadline, refreshed by traffic */
};

BPF_TABLE_PINNED("hash", struct cg_lb_key, struct cg_lb_value, cg_lb_services,
		 CG_LB_MAX_SERVICES + CG_LB_MAX_BACKENDS, CG_PIN_DIR "/cg_lb_services", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct cg_lb_revnat, cg_lb_revnat,
		 CG_LB_MAX_SERVICES, CG_PIN_DIR "/cg_lb_revnat", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct cg_lb_sock_key, struct cg_lb_sock_value, cg_lb_sock,
		 CG_LB_SOCK_MAX, CG_PIN_DIR "/cg_lb_sock");
/* Network namespaces served by the socket programs: netns cookie -> 1 (the agent's) or the
 * sandbox hash of the endpoint that lives there. */
BPF_TABLE_PINNED("hash", __u64, __u32, cg_lb_netns, CG_MAX_ENDPOINTS + 1, CG_PIN_DIR "/cg_lb_netns");
BPF_TABLE_PINNED("lru_hash", struct cg_lb_flow_key, struct cg_lb_flow_value, cg_lb_flows,
		 CG_LB_CT_MAX, CG_PIN_DIR "/cg_lb_flows");

static __always_inline void cg_lb_key_init(struct cg_lb_key *k, __u8 family, const __u8 *addr, __be16 port,
					   __u8 proto)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = family;
	k->proto = proto;
	k->port = port;
	if (family == 4)
		__builtin_memcpy(k->addr, addr, 4);
	else
		__builtin_memcpy(k->addr, addr, 16);
}

/* The service at (family, addr, port, proto), or NULL. */
static __always_inline struct cg_lb_value *cg_lb_service(struct cg_lb_key *k)
{
	k->slot = 0;
	return cg_lb_services.lookup(k);
}

/* Backend `slot` (1..count) of the service whose key is *k. */
static __always_inline struct cg_lb_value *cg_lb_backend(struct cg_lb_key *k, __u16 slot)
{
	k->slot = slot;
	return cg_lb_services.lookup(k);
}

/* A backend for a new connection: uniform over the service's slots. */
static __always_inline __u16 cg_lb_pick(const struct cg_lb_value *svc)
{
	return (__u16)(bpf_get_prandom_u32() % svc->count) + 1;
}
