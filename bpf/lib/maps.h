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

/* Policy: an LPM trie over (subject, peer, direction, protocol, port). The first 72 bits
 * of data (subject, peer, egress) are always significant; prefixlen 72 means any
 * protocol, 80 one protocol and any port, 80 + n the first n bits of the port. Peer 0
 * is the wildcard "any identity"; the datapath looks up the real peer and 0. */
struct cg_policy_key {
	__u32  prefixlen;
	__u32  subject;     /* local identity the entry protects */
	__u32  peer;        /* remote identity, 0 = any */
	__u8   egress;      /* 1 = traffic leaving the subject */
	__u8   proto;       /* IPPROTO_* */
	__be16 dport;       /* port, or ICMP type for ICMP */
};

struct cg_policy_value {
	__u8  deny;         /* 1 = an explicit deny */
	__u8  pad;
	__u16 l7;           /* L7 filter the proxy applies (plugin/proxy); 0 = none: no redirect */
	__u32 rule;         /* rule id, 0 = default allow */
};

/* IP (or prefix) -> identity, for addresses that are not local endpoints. */
struct cg_ipcache_key {
	__u32 prefixlen;    /* 32 (family + pad) + address bits */
	__u8  family;
	__u8  pad[3];
	__u8  addr[16];
};

struct cg_ipcache_value {
	__u32  identity;
	__u32  flags;
	__be32 tunnel_endpoint; /* VXLAN: the node hosting the address (IPv4, network order); 0 = none */
	__u32  pad;
};

/* Conntrack: one entry per flow, keyed by the tuple of its first packet. */
struct cg_ct_key {
	__u8   saddr[16];
	__u8   daddr[16];
	__be16 sport;       /* ICMP echo: identifier */
	__be16 dport;
	__u8   proto;
	__u8   family;
	__u8   pad[2];
};

struct cg_ct_value {
	__u64 expires;      /* CLOCK_MONOTONIC deadline, tick resolution (lib/conntrack.h cg_ct_now) */
	__u64 packets;
	__u64 bytes;
	__u32 src_identity; /* initiator */
	__u32 dst_identity;
	__u32 rule;         /* rule that allowed the flow */
	__u8  flags;        /* CG_CT_F_* */
	__u8  policy_sides; /* CG_CT_SIDE_*: the sides whose allow verdict is cached */
	__u8  pad[2];
	__u32 policy_rev;   /* cg_config.policy_rev that verdict was decided at; 0 = none */
	__u16 l7_egress;    /* L7 filter of the sender's egress side (CG_CT_F_PROXY flows), 0 = none */
	__u16 l7_ingress;   /* L7 filter of the receiver's ingress side, 0 = none */
};

#define CG_CT_F_REPLIED   0x1  /* a packet went back: the flow is established */
#define CG_CT_F_FIN_FWD   0x2
#define CG_CT_F_FIN_REV   0x4
#define CG_CT_F_RST       0x8
#define CG_CT_F_PROXY     0x10 /* the flow goes through the L7 proxy (lib/proxy.h), for its whole life */

#define CG_CT_SIDE_EGRESS  0x1  /* the sender's egress policy */
#define CG_CT_SIDE_INGRESS 0x2  /* the receiver's ingress policy */

/* Runtime switches and timeouts the agent can change without a rebuild. */
struct cg_config {
	__u32 flags;              /* CG_CFG_* */
	__u32 policy_rev;         /* bumped after every change of cg_policy; 0 = no verdict caching */
	__u64 tcp_timeout_ns;     /* established TCP */
	__u64 syn_timeout_ns;     /* TCP before the first reply */
	__u64 close_timeout_ns;   /* TCP after FIN both ways or RST */
	__u64 other_timeout_ns;   /* UDP, ICMP and the rest */
	__u32 tunnel_ifindex;     /* the instance's VXLAN device; 0 = no tunnel (native routing) */
	__u16 proxy_port;         /* the L7 proxy's listener port (host order); 0 = no proxy: L7 flows drop */
	__u16 pad;
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
	__u32 rule;         /* policy rule that decided, 0 = default */
	__u8  ct_state;     /* CG_CT_NEW ... CG_CT_RELATED */
	__u8  side;         /* policy side that decided: 1 = the sender's egress */
	__u8  pad[2];
};

/* Endpoints by host-side ifindex: the program's own configuration. */
BPF_TABLE_PINNED("hash", __u32, struct cg_endpoint, cg_endpoints,
		 CG_MAX_ENDPOINTS, CG_PIN_DIR "/cg_endpoints");

/* Endpoints by address: where a packet to a local address goes. */
BPF_TABLE_PINNED("hash", struct cg_ip_key, struct cg_endpoint, cg_ips,
		 2 * CG_MAX_ENDPOINTS, CG_PIN_DIR "/cg_ips");

/* Policy entries of every local identity. */
BPF_TABLE_PINNED("lpm_trie", struct cg_policy_key, struct cg_policy_value, cg_policy,
		 CG_POLICY_MAX, CG_PIN_DIR "/cg_policy", BPF_F_NO_PREALLOC);

/* The verdict of every entry for one peer, protocol and port (prefixlen 96 in cg_policy), with
 * the wildcard peer's deny folded in: one hash probe decides most packets, cg_policy the rest.
 * The agent derives it from cg_policy (datapath/policy/compile.py ExactVerdicts). */
BPF_TABLE_PINNED("hash", struct cg_policy_key, struct cg_policy_value, cg_policy_exact,
		 CG_POLICY_MAX, CG_PIN_DIR "/cg_policy_exact", BPF_F_NO_PREALLOC);

/* Identities of addresses that are not local endpoints (host addresses, later CIDRs). */
BPF_TABLE_PINNED("lpm_trie", struct cg_ipcache_key, struct cg_ipcache_value, cg_ipcache,
		 CG_IPCACHE_MAX, CG_PIN_DIR "/cg_ipcache", BPF_F_NO_PREALLOC);

/* Connection tracking; the agent removes expired entries, LRU covers pressure. */
BPF_TABLE_PINNED("lru_hash", struct cg_ct_key, struct cg_ct_value, cg_ct,
		 CG_CT_MAX, CG_PIN_DIR "/cg_ct");

BPF_TABLE_PINNED("array", __u32, struct cg_config, cg_config, 1, CG_PIN_DIR "/cg_config");

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
