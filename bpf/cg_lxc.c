/* SPDX-License-Identifier: Apache-2.0 */
/* Programs on an endpoint's host-side veth (tc clsact).
 *
 *   ingress: cg_from_container - every frame the container sends
 *   egress:  cg_to_container   - every frame the host stack sends into the container
 *
 * Compiled once per agent start; everything per endpoint lives in maps.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/events.h"
#include "lib/arp.h"
#include "lib/route.h"
#include "lib/ipv4.h"
#include "lib/ipv6.h"

/* Every handler returns a tc action, or -DROP_* to drop with an event. */
static __always_inline int cg_from_container_dispatch(struct __sk_buff *skb,
						      const struct cg_endpoint *ep)
{
	struct ethhdr eth;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return -DROP_INVALID;
	if (!cg_mac_eq(eth.h_source, ep->mac))
		return -DROP_INVALID_SMAC;
	if (eth.h_proto == bpf_htons(ETH_P_IP))
		return cg_ipv4_from_ep(skb, ep, &eth);
	if (eth.h_proto == bpf_htons(ETH_P_IPV6))
		return cg_ipv6_from_ep(skb, ep, &eth);
	if (eth.h_proto == bpf_htons(ETH_P_ARP))
		return cg_handle_arp(skb, ep);
	return -DROP_UNKNOWN_L3;
}

int cg_from_container(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct cg_endpoint *ep = cg_endpoints.lookup(&ifindex);
	int ret;

	if (!ep)
		return cg_drop(skb, NULL, DROP_NO_ENDPOINT, CG_DIR_FROM_EP);
	ret = cg_from_container_dispatch(skb, ep);
	if (ret < 0)
		return cg_drop(skb, ep, -ret, CG_DIR_FROM_EP);
	return ret;
}

int cg_to_container(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct cg_endpoint *ep = cg_endpoints.lookup(&ifindex);

	if (!ep)
		return cg_drop(skb, NULL, DROP_NO_ENDPOINT, CG_DIR_TO_EP);
	cg_count(skb, CG_OK_TO_EP);
	return TC_ACT_OK;
}
