"""The kvstore port (plugin.kvstore.port), its in-memory fake (memory), the etcd adapter (etcd), and
the loops built on the port: list-then-watch (listwatch) and the node's lease (session)."""
