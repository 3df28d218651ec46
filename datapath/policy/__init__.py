"""The policy language (Cilium-compatible): selectors, rules, strict parsing, the repository, the
compile into policy-map entries, and traces. Pure: the standard library and the pure packages only.

Parsing is strict: an unknown key, a bad port or an unsupported feature is an error that names the
rule and the field (`rule 3: ingress[0]: unknown field 'fromEndpoint'`), and a failed import leaves
the repository as it was. Never fail open: what cannot be enforced as written is refused with a
message naming the feature, and an endpoint selector (`{}` included) never selects a reserved
identity (host, world, init...) unless it names that `reserved:` label itself; entities name those.

This package re-exports what the rest of the agent uses of the language and the repository; the
compile and traces are imported from datapath.policy.compile and datapath.policy.trace.
"""

from datapath.policy.parse import MAX_BYTES, MAX_DEPTH, MAX_NODES, check_shape, parse_rule, parse_rules
from datapath.policy.repository import Change, Repository
from datapath.policy.rules import MAX_PORTS, PLAIN, PeerRule, PortRange, Rule, Scope
from datapath.policy.selectors import NAMESPACE_KEY, Requirement, Selector, is_reserved, namespaces_of, parse_selector

__all__ = [
    "MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "MAX_PORTS", "NAMESPACE_KEY", "PLAIN",
    "Change", "PeerRule", "PortRange", "Repository", "Requirement", "Rule", "Scope", "Selector",
    "check_shape", "is_reserved", "namespaces_of", "parse_rule", "parse_rules", "parse_selector",
]
