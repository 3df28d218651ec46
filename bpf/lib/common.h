/* SPDX-License-Identifier: Apache-2.0 */
/* Common types, constants and small helpers shared by every cellgate program.
 *
 * Verdict codes live here because both the metrics map (indexed by code) and the
 * event stream (reason byte) use them; datapath/reasons.py mirrors this table and a
 * unit test keeps the two in step.
 */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <linux/stddef.h>

/* <linux/if_arp.h> and <linux/in.h> pull in half the kernel and cost BCC over a
 * second per compile; these few constants are all we need from them. */
#define ARPHRD_ETHER    1
#define ARPOP_REQUEST   1
#define ARPOP_REPLY     2
#define IPPROTO_HOPOPTS 0
#define IPPROTO_ICMP    1
#define IPPROTO_TCP     6
#define IPPROTO_UDP     17
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_ICMPV6  58
#define IPPROTO_DSTOPTS 60
#define IPPROTO_SCTP    132

#ifndef CG_PIN_DIR
#error "CG_PIN_DIR must be set with -DCG_PIN_DIR=\"/sys/fs/bpf/<name>\""
#endif
#ifndef CG_MAX_ENDPOINTS
#define CG_MAX_ENDPOINTS 65536
#endif
#ifndef CG_EVENT_PAGES
#define CG_EVENT_PAGES 256  /* 1 MiB: about 10,000 events of slack for the reader */
#endif
#ifndef CG_POLICY_MAX
#define CG_POLICY_MAX 1048576
#endif
#ifndef CG_IPCACHE_MAX
#define CG_IPCACHE_MAX 65536
#endif
#ifndef CG_CT_MAX
#define CG_CT_MAX 131072
#endif

/* Verdicts below 128 are "the packet went somewhere"; 128 and up are drops.
 * Handlers return a tc action, or -DROP_* so that the program drops once, with an
 * event, in a single place. */
#define CG_OK_LOCAL        1   /* redirected straight into a local endpoint */
#define CG_OK_STACK        2   /* handed to the host stack (host-bound or routed out) */
#define CG_OK_TO_EP        3   /* host stack delivered it into the endpoint */
#define CG_OK_ARP          4   /* ARP request answered by the datapath */
#define CG_OK_ND           5   /* neighbour solicitation answered by the datapath */
#define CG_OK_QUIET        6   /* link housekeeping consumed without a reply (GARP, DAD, MLD, RS) */
#define CG_OK_POLICY       7   /* a new flow allowed by policy (verdict events) */
#define CG_OK_EVENT_LOST   8   /* not a packet's fate: an event the ring buffer had no room for */
#define CG_OK_TUNNEL       12  /* sent into the VXLAN tunnel towards another node */
#define CG_OK_PROXY        13  /* handed to the L7 proxy's socket (bpf_sk_assign) */
#define CG_OK_LB           14  /* a service VIP translated to a backend on this node (packet level) */
#define CG_OK_LB_DSR       15  /* a service VIP translated to a backend on another node, direct server return */

#define DROP_INVALID_SMAC  130 /* source MAC is not the endpoint's */
#define DROP_INVALID_DMAC  131 /* destination MAC is not the gateway's */
#define DROP_INVALID_SIP   132 /* source IP is not the endpoint's */
#define DROP_POLICY        133 /* no policy entry allows the flow */
#define DROP_INVALID       134 /* truncated or malformed header */
#define DROP_UNKNOWN_L3    139 /* neither IPv4, IPv6 nor ARP */
#define DROP_NO_ENDPOINT   150 /* program runs on an interface with no endpoint entry */
#define DROP_INVALID_ARP   151 /* ARP with a sender that is not the endpoint */
#define DROP_ROUTER_ADV    152 /* IPv6 router advertisement or redirect from an endpoint */
#define DROP_NO_IPV6       153 /* IPv6 packet from an endpoint without an IPv6 address */
#define DROP_NO_IPV4       154 /* IPv4/ARP packet from an endpoint without an IPv4 address */
#define DROP_FRAG          157 /* non-first fragment that only an L3 rule could allow */
#define DROP_CT_CREATE     155 /* conntrack entry could not be created */
#define DROP_POLICY_DENY   181 /* an explicit deny rule matched */
#define DROP_NO_TUNNEL_KEY 190 /* a packet on the VXLAN device without tunnel metadata */
#define DROP_UNKNOWN_NODE  191 /* encapsulated by an outer source that is not a known node (forged) */
#define DROP_NO_CLUSTER_IDENTITY 192 /* identity not cluster-wide yet: it does not fit the 24-bit VNI */
#define DROP_NOT_LOCAL     193 /* tunnelled to this node for an address that is no local endpoint */
#define DROP_TUNNEL_SRC    194 /* inner source lives on another node than the one that sent it */
#define DROP_NO_TUNNEL_ENDPOINT 195 /* routed into the tunnel to an address no node hosts */
#define DROP_PROXY_LOOKUP  178 /* L7 policy applies and the proxy's listener is not there (fail closed) */
#define DROP_PROXY_ASSIGN  179 /* L7 policy applies and the proxy's socket refused the packet */
#define DROP_PROXY_REQUIRED 196 /* L7 policy applies on a path that cannot reach the proxy */
#define DROP_LB_BACKEND    197 /* packet-level balancing chose a backend outside the cluster's endpoints */

/* skb->mark: the proxy's routing (fwmark rule to the local table) and its upstream sockets. */
#define CG_MARK_MASK       0xf00
#define CG_MARK_TO_PROXY   0x200  /* set with bpf_sk_assign; `ip rule fwmark 0x200/0xf00 lookup T` (naming.proxy_table) */
#define CG_MARK_FROM_PROXY 0xa00  /* SO_MARK of the proxy's upstream sockets; the rest is the identity */

/* cg_metrics: one counter per verdict code and direction, at code | direction << 8
 * (direction 0 from the endpoint, Cilium's EGRESS; 1 towards it, INGRESS) */
#define CG_METRICS_CODES   256
#define CG_METRICS_SIZE    512

/* Endpoint flags (struct cg_endpoint.flags). */
#define CG_EP_F_IPV4       0x1
#define CG_EP_F_IPV6       0x2

/* Event direction. */
#define CG_DIR_FROM_EP     0
#define CG_DIR_TO_EP       1

#define CG_EVENT_DROP      1
#define CG_EVENT_VERDICT   2   /* policy decision for a new flow */
#define CG_EVENT_TRACE     3   /* a forwarded packet (only while tracing is on) */

/* Conntrack states (events and trace). */
#define CG_CT_NEW          0
#define CG_CT_ESTABLISHED  1
#define CG_CT_REPLY        2
#define CG_CT_RELATED      3

/* Reserved identities (datapath/identity.py). */
#define CG_ID_ANY          0
#define CG_ID_HOST         1
#define CG_ID_WORLD        2
#define CG_ID_REMOTE_NODE  6
#define CG_ID_FIRST_ALLOCATED 256
#define CG_TUNNEL_MAX_ID   0xffffff /* the VNI carries 24 bits of identity */

/* cg_config flags. */
#define CG_CFG_TRACE       0x1
#define CG_CFG_QUIET       0x2   /* no events for allowed new flows: no monitor listens */
#define CG_CFG_LB_FLOWS    0x4   /* packet-level balancing is on: replies of balanced flows are translated */

static __always_inline int cg_mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

static __always_inline void cg_mac_copy(__u8 *dst, const __u8 *src)
{
	dst[0] = src[0]; dst[1] = src[1]; dst[2] = src[2];
	dst[3] = src[3]; dst[4] = src[4]; dst[5] = src[5];
}

static __always_inline int cg_ip6_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline __u16 cg_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Copy `len` bytes at `off` out of the packet: straight from the linear head when they lie in
 * it (a few loads), else through bpf_skb_load_bytes (a helper call, which also reads paged data).
 * 0, or < 0 when the packet is shorter. */
static __always_inline int cg_load(struct __sk_buff *skb, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= 256 && data + off + len <= end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

