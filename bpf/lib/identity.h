/* SPDX-License-Identifier: Apache-2.0 */
/* Security identities of the parties of a packet: a local endpoint carries its own
 * (cg_endpoints / cg_ips); any other address is looked up in the ipcache, else world.
 * Family-neutral: addresses are byte arrays of the family's length.
 */
#pragma once

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/route.h"

/* The longest ipcache prefix holding a non-endpoint address, or NULL. */
static __always_inline struct cg_ipcache_value *cg_ipcache_find(__u8 family, const __u8 *addr)
{
	struct cg_ipcache_key key = {};

	key.family = family;
	if (family == 4) {
		key.prefixlen = 32 + 32;
		__builtin_memcpy(key.addr, addr, 4);
	} else {
		key.prefixlen = 32 + 128;
		__builtin_memcpy(key.addr, addr, 16);
	}
	return cg_ipcache.lookup(&key);
}

/* Identity of a non-endpoint address: host addresses and known prefixes; else world. */
static __always_inline __u32 cg_ipcache_identity(__u8 family, const __u8 *addr)
{
	struct cg_ipcache_value *val = cg_ipcache_find(family, addr);

	return val ? val->identity : CG_ID_WORLD;
}

/* The identity of a sender reached through the host stack. */
static __always_inline __u32 cg_peer_identity(__u8 family, const __u8 *addr)
{
	struct cg_endpoint *local = cg_lookup_ip(family, addr);

	return local ? local->identity : cg_ipcache_identity(family, addr);
}

/* The identity of a receiver: the local endpoint `dst` if there is one, else the ipcache's;
 * *node is the node that hosts a remote receiver (0 if none): one lookup serves both. */
static __always_inline __u32 cg_dst_identity(const struct cg_endpoint *dst, __u8 family, const __u8 *addr,
					     __be32 *node)
{
	struct cg_ipcache_value *val;

	*node = 0;
	if (dst)
		return dst->identity;
	val = cg_ipcache_find(family, addr);
	if (!val)
		return CG_ID_WORLD;
	*node = val->tunnel_endpoint;
	return val->identity;
}
