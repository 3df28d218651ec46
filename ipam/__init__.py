"""Host-scope IP address management: pure allocation rules plus an atomic on-disk ledger."""
