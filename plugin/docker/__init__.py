"""The Docker libnetwork remote driver and IPAM driver (wire protocol and routes)."""
