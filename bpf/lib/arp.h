/* SPDX-License-Identifier: Apache-2.0 */
/* ARP from an endpoint: answer requests with the gateway MAC, drop spoofing.
 *
 * Routing is pure L3 through the host, so every on-link address the container asks
 * for (its gateway or a peer in its subnet) resolves to the host-side veth MAC.
 */
#pragma once

#include "lib/common.h"
#include "lib/events.h"

struct cg_arp_eth {
	struct ethhdr eth;
	__be16 htype;
	__be16 ptype;
	__u8   hlen;
	__u8   plen;
	__be16 op;
	__u8   sha[6];
	__be32 sip;
	__u8   tha[6];
	__be32 tip;
} __attribute__((packed));

static __always_inline int cg_handle_arp(struct __sk_buff *skb, const struct cg_endpoint *ep)
{
	struct cg_arp_eth arp;
	__be32 target;

	if (bpf_skb_load_bytes(skb, 0, &arp, sizeof(arp)) < 0)
		return -DROP_INVALID;
	if (arp.htype != bpf_htons(ARPHRD_ETHER) || arp.ptype != bpf_htons(ETH_P_IP) ||
	    arp.hlen != ETH_ALEN || arp.plen != 4)
		return -DROP_INVALID;
	if (!(ep->flags & CG_EP_F_IPV4))
		return -DROP_NO_IPV4;
	if (!cg_mac_eq(arp.sha, ep->mac))
		return -DROP_INVALID_ARP;
	if (arp.sip == 0 && arp.op == bpf_htons(ARPOP_REQUEST))
		return cg_quiet(skb);                  /* RFC 5227 probe */
	if (arp.sip != ep->ipv4)
		return -DROP_INVALID_ARP;
	if (arp.op != bpf_htons(ARPOP_REQUEST) || arp.tip == arp.sip)
		return cg_quiet(skb);                  /* gratuitous ARP or a reply */

	target = arp.tip;
	cg_mac_copy(arp.eth.h_dest, ep->mac);
	cg_mac_copy(arp.eth.h_source, ep->host_mac);
	arp.op = bpf_htons(ARPOP_REPLY);
	cg_mac_copy(arp.tha, ep->mac);
	arp.tip = arp.sip;
	cg_mac_copy(arp.sha, ep->host_mac);
	arp.sip = target;
	if (bpf_skb_store_bytes(skb, 0, &arp, sizeof(arp), 0) < 0)
		return -DROP_INVALID;
	cg_count(skb, CG_OK_ARP, 0); /* answered to the endpoint that asked */
	return bpf_redirect(skb->ifindex, 0);
}
