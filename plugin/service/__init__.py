"""The use cases of the agent (networks, endpoints, restore, policy, CNI); the doors call these.

Imports no door (plugin/docker, plugin/api, plugin/cni) and no kernel adapter.
"""

from plugin.service.agent import HYPOTHETICAL, Agent
from plugin.service.endpoints import JoinInfo
from plugin.service.restore import RestoreReport, RuntimeView, StaleReport

__all__ = ["HYPOTHETICAL", "Agent", "JoinInfo", "RestoreReport", "RuntimeView", "StaleReport"]
