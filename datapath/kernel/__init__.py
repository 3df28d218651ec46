"""The only code that touches the kernel: BCC compile and maps, netlink via pyroute2, iptables.

executor.py orders plans and dispatches each object to the handler of its kind: links.py
(netlink kinds), maps.py (pinned-map kinds and the maps written outside plans), iptables.py.
"""
