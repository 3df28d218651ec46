"""The transparent L7 proxy: its own process (started and supervised by the agent), asyncio based.
The datapath hands it the flows whose policy entry carries L7 rules (bpf_sk_assign to its
IP_TRANSPARENT listener); it decides each HTTP request, gRPC call or Kafka message with
datapath.policy.l7 and forwards allowed ones upstream with a mark the datapath recognises.
"""
