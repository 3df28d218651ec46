"""datapath.plan.desired_state with a scope: the same objects in scope as without one."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from datapath import plan
from tests.unit.test_plan import worlds


@given(worlds(), st.data())
def test_a_scope_never_changes_what_lies_inside_it(world: Any, data: st.DataObject) -> None:
    networks, endpoints, settings, hosts = world
    everything = plan.desired_state(networks, endpoints, settings, hosts)
    scope = data.draw(st.sets(st.sampled_from(sorted(plan.keys(everything))))) if everything else set()
    scoped = plan.desired_state(networks, endpoints, settings, hosts, scope)
    assert {o for o in scoped if o.key in scope} == {o for o in everything if o.key in scope}


@given(worlds())
def test_one_endpoint_scope_builds_only_that_endpoint(world: Any) -> None:
    networks, endpoints, settings, hosts = world
    for ep in endpoints:
        scope = plan.keys(plan.endpoint_objects(ep, settings))
        scoped = plan.desired_state(networks, endpoints, settings, hosts, scope)
        others = [e for e in endpoints if e.id != ep.id]
        built = plan.desired_state(networks, [], settings, hosts) | plan.endpoint_objects(ep, settings)
        assert scoped == built or any(plan.keys(plan.endpoint_objects(o, settings)) & scope for o in others)
