"""Observability: the flow log (plugin.observe.flowlog), metrics and the service map."""
