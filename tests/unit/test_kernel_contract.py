"""The Kernel-port contract (tests/contract/kernel_port.py) against datapath.fake.FakeKernel.

tests/kernel/test_executor_contract.py runs the same functions against the real executor.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from datapath import fake, plan
from tests.contract.kernel_port import *  # noqa: F403 - the contract's tests and `backend`
from tests.contract.kernel_port import Backend, fake_backend


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    yield fake_backend("cgkfake1", 250), fake_backend("cgkfake2", 251)


def test_the_fake_has_a_handler_for_every_plan_kind() -> None:
    assert set(fake.HANDLERS) == set(plan.KINDS)
