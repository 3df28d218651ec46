"""The only code that touches the kernel: BCC compile and maps, netlink via pyroute2, iptables."""
