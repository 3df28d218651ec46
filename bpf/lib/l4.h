/* SPDX-License-Identifier: Apache-2.0 */
/* Parse a packet into the flow facts conntrack and policy need.
 *
 * Every read goes through bpf_skb_load_bytes, so a short or odd packet yields an error,
 * never an out-of-bounds access. ICMP errors carry the tuple of the flow they report
 * (`related`), taken from the quoted inner header, when the error travels back to the
 * sender of the quoted packet (and, when an endpoint sends it, comes from that packet's
 * receiver); any other error is an ICMP packet of its own that policy judges.
 */
#pragma once

#include "lib/common.h"

struct cg_flow {
	__u8   family;       /* 4 or 6 */
	__u8   proto;        /* L4 protocol of the packet (after IPv6 extension headers) */
	__u8   tcp_flags;
	__u8   related;      /* an ICMP error: the tuple below is the quoted flow */
	__u8   frag;         /* a non-first fragment: no L4 header, ports unknown */
	__u8   ct_proto;     /* conntrack tuple from here on */
	__be16 policy_port;  /* what policy sees: destination port or ICMP type */
	__be16 sport;        /* ICMP echo: the identifier */
	__be16 dport;
	__u8   saddr[16];
	__u8   daddr[16];
};

#define CG_TCP_F_FIN  0x01
#define CG_TCP_F_SYN  0x02
#define CG_TCP_F_RST  0x04
#define CG_TCP_F_ACK  0x10

static __always_inline int cg_is_icmp_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == 3 || type == 4 || type == 11 || type == 12;
	return type >= 1 && type <= 4; /* ICMPv6 unreachable, too big, time exceeded, param problem */
}

static __always_inline int cg_icmp_echo(__u8 proto, __u8 type, int request)
{
	if (proto == IPPROTO_ICMP)
		return type == (request ? 8 : 0);
	return type == (request ? 128 : 129);
}

/* Conntrack ports of the L4 header at `off`: TCP, UDP and SCTP ports, or the ICMP echo
 * identifier (the source port of a request, the destination port of its reply). */
static __always_inline int cg_l4_ports(struct __sk_buff *skb, __u32 off, __u8 proto, __be16 *sport,
				       __be16 *dport, __u8 *icmp_type)
{
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		__be16 ports[2];

		if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
			return -DROP_INVALID;
		*sport = ports[0];
		*dport = ports[1];
	} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct {
			__u8 type;
			__u8 code;
			__be16 csum;
			__be16 id;
		} icmp;

		if (bpf_skb_load_bytes(skb, off, &icmp, sizeof(icmp)) < 0)
			return -DROP_INVALID;
		*icmp_type = icmp.type;
		if (cg_icmp_echo(proto, icmp.type, 1))
			*sport = icmp.id;
		else if (cg_icmp_echo(proto, icmp.type, 0))
			*dport = icmp.id;
	}
	return 0;
}

/* Ports of the packet's own L4 header, plus what policy sees (port or ICMP type). */
static __always_inline int cg_parse_ports(struct __sk_buff *skb, __u32 off, struct cg_flow *f)
{
	__u8 type = 0;
	int ret = cg_l4_ports(skb, off, f->proto, &f->sport, &f->dport, &type);

	if (ret < 0)
		return ret;
	if (f->proto == IPPROTO_ICMP || f->proto == IPPROTO_ICMPV6) {
		f->policy_port = bpf_htons(type);
		if (cg_is_icmp_error(f->proto, type))
			f->related = 1;
		return 0;
	}
	f->policy_port = f->dport;
	if (f->proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, off + 13, &f->tcp_flags, 1) < 0)
		return -DROP_INVALID;
	return 0;
}

/* IPv6 extension headers: skip up to four; a fragment header ends with its next header. */
static __always_inline int cg_ipv6_l4(struct __sk_buff *skb, __u32 *off, __u8 *nexthdr, __u8 *frag)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		struct {
			__u8 nexthdr;
			__u8 len;
			__be16 frag_off;
		} ext;

		if (*nexthdr != IPPROTO_HOPOPTS && *nexthdr != IPPROTO_ROUTING && *nexthdr != IPPROTO_DSTOPTS &&
		    *nexthdr != IPPROTO_FRAGMENT)
			return 0;
		if (bpf_skb_load_bytes(skb, *off, &ext, sizeof(ext)) < 0)
			return -DROP_INVALID;
		if (*nexthdr == IPPROTO_FRAGMENT) {
			if (ext.frag_off & bpf_htons(0xfff8))
				*frag = 1;
			*off += 8;
		} else {
			*off += (ext.len + 1) * 8;
		}
		*nexthdr = ext.nexthdr;
	}
	return -DROP_INVALID;
}

/* For an ICMP error: the tuple of the quoted packet, which is the flow it is about.
 * `from_ep`: an endpoint sent the error, so it must be the quoted packet's receiver; a
 * router in the host stack may report on any packet, but only back to its sender. */
static __always_inline int cg_parse_quoted(struct __sk_buff *skb, __u32 off, struct cg_flow *f, int from_ep)
{
	__u8 proto;

	if (f->family == 4) {
		struct iphdr inner;

		if (bpf_skb_load_bytes(skb, off, &inner, sizeof(inner)) < 0 || inner.ihl < 5)
			return -DROP_INVALID;
		if (inner.saddr != *(const __u32 *)f->daddr ||
		    (from_ep && inner.daddr != *(const __u32 *)f->saddr)) {
			f->related = 0;   /* not about a flow of these two */
			return 0;
		}
		__builtin_memset(f->saddr, 0, 16);
		__builtin_memset(f->daddr, 0, 16);
		__builtin_memcpy(f->saddr, &inner.saddr, 4);
		__builtin_memcpy(f->daddr, &inner.daddr, 4);
		proto = inner.protocol;
		off += inner.ihl * 4;
	} else {
		struct ipv6hdr inner;

		if (bpf_skb_load_bytes(skb, off, &inner, sizeof(inner)) < 0)
			return -DROP_INVALID;
		if (!cg_ip6_eq(inner.saddr.in6_u.u6_addr8, f->daddr) ||
		    (from_ep && !cg_ip6_eq(inner.daddr.in6_u.u6_addr8, f->saddr))) {
			f->related = 0;
			return 0;
		}
		__builtin_memcpy(f->saddr, inner.saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(f->daddr, inner.daddr.in6_u.u6_addr8, 16);
		proto = inner.nexthdr;
		off += sizeof(inner);
	}
	__u8 type = 0;

	f->sport = 0;
	f->dport = 0;
	f->ct_proto = proto;
	return cg_l4_ports(skb, off, proto, &f->sport, &f->dport, &type);
}

static __always_inline int cg_flow_ipv4(struct __sk_buff *skb, const struct iphdr *ip, struct cg_flow *f,
					int from_ep)
{
	__u32 off = ETH_HLEN + ip->ihl * 4;
	int ret;

	f->family = 4;
	f->proto = f->ct_proto = ip->protocol;
	__builtin_memcpy(f->saddr, &ip->saddr, 4);
	__builtin_memcpy(f->daddr, &ip->daddr, 4);
	if (ip->frag_off & bpf_htons(0x1fff)) {
		f->frag = 1;
		return 0;
	}
	ret = cg_parse_ports(skb, off, f);
	if (ret < 0 || !f->related)
		return ret;
	return cg_parse_quoted(skb, off + 8, f, from_ep);
}

static __always_inline int cg_flow_ipv6(struct __sk_buff *skb, const struct ipv6hdr *ip6, struct cg_flow *f,
					int from_ep)
{
	__u32 off = ETH_HLEN + sizeof(struct ipv6hdr);
	__u8 nexthdr = ip6->nexthdr;
	int ret;

	f->family = 6;
	__builtin_memcpy(f->saddr, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(f->daddr, ip6->daddr.in6_u.u6_addr8, 16);
	ret = cg_ipv6_l4(skb, &off, &nexthdr, &f->frag);
	if (ret < 0)
		return ret;
	f->proto = f->ct_proto = nexthdr;
	if (f->frag)
		return 0;
	ret = cg_parse_ports(skb, off, f);
	if (ret < 0 || !f->related)
		return ret;
	return cg_parse_quoted(skb, off + 8, f, from_ep);
}
