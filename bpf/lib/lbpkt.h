/* SPDX-License-Identifier: Apache-2.0 */
/* Packet-level load balancing (IPv4) for traffic the socket programs never see: packets that
 * arrive on a node's device for a VIP (clients outside the cluster, or on hosts without an
 * agent). cg_netdev.c translates the destination to a backend chosen once per flow and kept
 * in cg_lb_flows:
 *
 *   - a local backend: the packet goes on to it through the stack (its ingress policy
 *     applies in cg_to_container); its replies are translated back in cg_from_container;
 *   - a backend on another node: direct server return. The packet is tunnelled there (VXLAN,
 *     the client's identity as VNI; native routing: through the stack) carrying the service
 *     address in an IPv4 option (CG_DSR_OPT, as Cilium's), on a TCP flow's SYN and on every
 *     UDP datagram. That node records the flow (cg_overlay.c / cg_netdev.c) and its backend's
 *     replies leave from the service address straight to the client.
 *
 * Cost of DSR: 8 bytes of IP option on those packets (the backend's kernel ignores unknown
 * options), one cg_lb_flows entry per flow on each of the two nodes. IPv6 VIPs are balanced at
 * the socket level only.
 */
#pragma once

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/lb.h"
#include "lib/l4.h"

#define CG_DSR_OPT      0x9a   /* option type: copied, class 0, number 26 (Cilium's) */
#define CG_DSR_OPT_LEN  8
#define CG_LB_FLOW_NS   (600ULL * 1000000000ULL)  /* idle flows expire (the agent sweeps; LRU under pressure) */

#define CG_IP4_CSUM     (ETH_HLEN + offsetof(struct iphdr, check))
#define CG_IP4_SADDR    (ETH_HLEN + offsetof(struct iphdr, saddr))
#define CG_IP4_DADDR    (ETH_HLEN + offsetof(struct iphdr, daddr))

struct cg_dsr_opt {
	__u8   type;
	__u8   len;
	__be16 port;
	__be32 addr;
};

static __always_inline void cg_lb_flow_key4(struct cg_lb_flow_key *k, __be32 saddr, __be32 daddr, __be16 sport,
					    __be16 dport, __u8 proto)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->saddr, &saddr, 4);
	__builtin_memcpy(k->daddr, &daddr, 4);
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->family = 4;
}

static __always_inline __u32 cg_l4_csum_off(__u8 proto, __u32 l4)
{
	return proto == IPPROTO_TCP ? l4 + 16 : l4 + 6;
}

/* Rewrite one address (at addr_off) and one port (at port_off) of an IPv4 TCP/UDP packet,
 * with both checksums. 0, or -DROP_INVALID. */
static __always_inline int cg_nat4(struct __sk_buff *skb, __u8 proto, __u32 l4, __u32 addr_off, __be32 from,
				   __be32 to, __u32 port_off, __be16 pfrom, __be16 pto)
{
	__u32 csum = cg_l4_csum_off(proto, l4);
	__u64 flags = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (from != to) {
		if (bpf_l4_csum_replace(skb, csum, from, to, flags | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, CG_IP4_CSUM, from, to, 4) < 0 ||
		    bpf_skb_store_bytes(skb, addr_off, &to, 4, 0) < 0)
			return -DROP_INVALID;
	}
	if (pfrom != pto) {
		if (bpf_l4_csum_replace(skb, csum, pfrom, pto, flags | 2) < 0 ||
		    bpf_skb_store_bytes(skb, port_off, &pto, 2, 0) < 0)
			return -DROP_INVALID;
	}
	return 0;
}

/* Insert the DSR option naming the service (vip, vport) after the 20-byte header. */
static __always_inline int cg_dsr_add_opt4(struct __sk_buff *skb, __be32 vip, __be16 vport)
{
	struct cg_dsr_opt opt = {CG_DSR_OPT, CG_DSR_OPT_LEN, vport, vip};
	__u16 hdr[14];
	__u32 sum = 0;
	int i;

	if (bpf_skb_adjust_room(skb, CG_DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
		return -DROP_INVALID;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &opt, sizeof(opt), 0) < 0)
		return -DROP_INVALID;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, hdr, sizeof(hdr)) < 0)
		return -DROP_INVALID;
	((__u8 *)hdr)[0] = 0x47;                                 /* version 4, ihl 7 */
	hdr[1] = bpf_htons(bpf_ntohs(hdr[1]) + CG_DSR_OPT_LEN);  /* tot_len */
	hdr[5] = 0;                                              /* check */
#pragma unroll
	for (i = 0; i < 14; i++)
		sum += hdr[i];
	hdr[5] = cg_csum_fold(sum);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, hdr, sizeof(hdr), 0) < 0)
		return -DROP_INVALID;
	return 0;
}

/* On the backend's node: a packet for a local endpoint that carries our DSR option naming a
 * known service: remember that the backend's replies answer as that service. */
static __always_inline void cg_dsr_learn4(struct __sk_buff *skb, const struct iphdr *ip)
{
	struct cg_lb_flow_value rev = {};
	struct cg_lb_flow_key k;
	struct cg_dsr_opt opt;
	struct cg_lb_key svc;
	__be16 ports[2];

	if (ip->ihl != 7 || (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP))
		return;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &opt, sizeof(opt)) < 0 ||
	    opt.type != CG_DSR_OPT || opt.len != CG_DSR_OPT_LEN)
		return;
	cg_lb_key_init(&svc, 4, (const __u8 *)&opt.addr, opt.port, ip->protocol);
	if (!cg_lb_service(&svc))
		return;                                      /* names no service: never answer as it */
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 28, ports, sizeof(ports)) < 0)
		return;
	cg_lb_flow_key4(&k, ip->daddr, ip->saddr, ports[1], ports[0], ip->protocol);
	__builtin_memcpy(rev.addr, &opt.addr, 4);
	rev.port = opt.port;
	rev.expires = bpf_ktime_get_ns() + CG_LB_FLOW_NS;
	cg_lb_flows.update(&k, &rev);
}

/* From a local endpoint: a reply of a backend to a client whose packets were balanced to it
 * (here or, with DSR, on another node) leaves from the service address. Only while packet
 * balancing is on (CG_CFG_LB_FLOWS). 1 if it rewrote the packet, 0 if not, else -DROP_*. */
static __always_inline int cg_lb_reply4(struct __sk_buff *skb, const struct cg_ctx *ctx, const struct iphdr *ip,
					const struct cg_flow *f)
{
	struct cg_lb_flow_value *rev;
	struct cg_lb_flow_key k;
	__be32 vip;
	__u32 l4;
	int ret;

	if (!(ctx->cfg_flags & CG_CFG_LB_FLOWS) || f->frag || f->related ||
	    (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP))
		return 0;
	cg_lb_flow_key4(&k, ip->saddr, ip->daddr, f->sport, f->dport, ip->protocol);
	rev = cg_lb_flows.lookup(&k);
	if (!rev)
		return 0;
	rev->expires = bpf_ktime_get_ns() + CG_LB_FLOW_NS;
	__builtin_memcpy(&vip, rev->addr, 4);
	l4 = ETH_HLEN + ip->ihl * 4;
	ret = cg_nat4(skb, ip->protocol, l4, CG_IP4_SADDR, ip->saddr, vip, l4, f->sport, rev->port);
	return ret < 0 ? ret : 1;
}
