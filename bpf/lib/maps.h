/* SPDX-License-Identifier: Apache-2.0 */
/* Map layouts: the contract between the kernel programs and the agent.
 *
 * Every struct here has a ctypes mirror in datapath/kernel/layout.py; the unit test
 * tests/kernel/test_layout.py compares sizes and field offsets against this file, so
 * change both together. Maps that hold state are pinned under CG_PIN_DIR so that
 * they, and the traffic they steer, outlive the agent process.
 */
#pragma once

#include "lib/common.h"

/* One local endpoint, as seen from its host-side veth. */
struct cg_endpoint {
	__u32 ifindex;      /* host-side veth */
	__u32 identity;     /* security identity (0 until identities exist) */
	__u32 ipv4;         /* network byte order; valid when CG_EP_F_IPV4 */
	__u32 sandbox;      /* hash of the sandbox; endpoints of one container share it */
	__u8  ipv6[16];     /* valid when CG_EP_F_IPV6 */
	__u8  mac[6];       /* container-side MAC */
	__u8  host_mac[6];  /* host-side veth MAC, which is the gateway MAC */
	__u16 flags;        /* CG_EP_F_* */
	__u16 pad;
};

/* Address key: IPv4 uses the first four bytes of addr, the rest stay zero. */
struct cg_ip_key {
	__u8 family;        /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16];
};

struct cg_metric {
	__u64 packets;
	__u64 bytes;
};

/* Fixed-size event record written to the ring buffer. */
struct cg_event {
	__u64 ts_ns;        /* bpf_ktime_get_ns() */
	__u8  type;         /* CG_EVENT_* */
	__u8  reason;       /* verdict code from common.h */
	__u8  dir;          /* CG_DIR_* */
	__u8  l4proto;      /* IPPROTO_* or 0 */
	__u32 ifindex;      /* host-side veth the program ran on */
	__u32 src_identity;
	__u32 dst_identity;
	__u16 ethertype;    /* host byte order */
	__u16 sport;        /* host byte order; ICMP: type */
	__u16 dport;        /* host byte order; ICMP: code */
	__u16 arp_op;       /* host byte order, ARP only */
	__u32 len;          /* skb->len */
	__u8  smac[6];
	__u8  dmac[6];
	__u8  saddr[16];    /* IPv4 in the first four bytes */
	__u8  daddr[16];
};

/* Endpoints by host-side ifindex: the program's own configuration. */
BPF_TABLE_PINNED("hash", __u32, struct cg_endpoint, cg_endpoints,
		 CG_MAX_ENDPOINTS, CG_PIN_DIR "/cg_endpoints");

/* Endpoints by address: where a packet to a local address goes. */
BPF_TABLE_PINNED("hash", struct cg_ip_key, struct cg_endpoint, cg_ips,
		 2 * CG_MAX_ENDPOINTS, CG_PIN_DIR "/cg_ips");

/* Packets and bytes per verdict code, per CPU. */
BPF_TABLE_PINNED("percpu_array", __u32, struct cg_metric, cg_metrics,
		 CG_METRICS_SIZE, CG_PIN_DIR "/cg_metrics");

/* Events for `cellgate monitor`. BPF_RINGBUF_OUTPUT cannot pin, so this spells out the
 * same table with a pin path: programs left attached by an earlier agent keep writing
 * into the ring the next agent reads. */
struct cg_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" CG_PIN_DIR "/cg_events")))
struct cg_events_table_t cg_events = { .max_entries = CG_EVENT_PAGES * PAGE_SIZE };
