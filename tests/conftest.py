import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `from realagent import ...`

from realagent import RealAgent, require_real_agent  # noqa: E402

_REAL_AGENT_FIXTURES = {"real_agent", "real_agent_module"}


@pytest.fixture
def real_agent():
    """A fresh real qemu-ga (unix-listen, as nobody, dangerous commands blocked)."""
    require_real_agent()
    with RealAgent() as agent:
        yield agent


@pytest.fixture(scope="module")
def real_agent_module():
    """One real qemu-ga shared by a module: its parser state and file handles are
    shared too, so begin each conversation with AgentConn.sync(); if a test can
    make the agent exit, use `real_agent` instead (or call .restart())."""
    require_real_agent()
    with RealAgent() as agent:
        yield agent


def pytest_collection_modifyitems(items):
    # Tests using the real agent get the `real_agent` marker (-m "not real_agent").
    for item in items:
        if _REAL_AGENT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_agent)
