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


# ---------------------------------------------------------------------------
# VM fixtures (tests/vm): a real QEMU VM (TCG) running the real qemu-ga inside.
# The guest is built and cached by tests/vm/build.sh; the VM API is
# tests/vm/vm.py (class VM).  Tests using these fixtures get the `vm` marker
# (-m "not vm" leaves them out).  QEMU missing: skip, or fail when CI=true.
# ---------------------------------------------------------------------------

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vm"))
import vm as _qgavm  # noqa: E402  (tests/vm/vm.py)

_VM_FIXTURES = {"vm", "vm_module", "vm_image"}


@pytest.fixture(scope="session")
def vm_image():
    """Runs tests/vm/build.sh once per session (a no-op when its cache is
    fresh); returns the cache directory holding vmlinuz and initrd.img."""
    _qgavm.require_vm()
    try:
        return _qgavm.build()
    except _qgavm.VMError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def vm(vm_image):
    """A freshly booted VM whose qemu-ga has its port open (nothing has been
    sent to the agent socket yet).  Torn down with QMP quit, then SIGKILL; a
    test may shut it down, kill it or restart() it."""
    with _qgavm.VM(cache=vm_image) as machine:
        yield machine


@pytest.fixture(scope="module")
def vm_module(vm_image):
    """One VM shared by a module: the agent's parser state is shared too, so
    begin each conversation with a sync; a test that stops or kills the VM
    must bring it back (vm_module.restart()) or use `vm` instead."""
    with _qgavm.VM(cache=vm_image) as machine:
        yield machine


@pytest.hookimpl(specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_vm(items):
    # A second implementation of the hook under its own name (the one above
    # stays as it is): tests using the VM fixtures get the `vm` marker.
    for item in items:
        if _VM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vm)


# ---------------------------------------------------------------------------
# Hypothesis profiles (tests/test_*_props.py): "ci" keeps the property tests
# to a few tens of seconds; HYPOTHESIS_PROFILE=long is for a long run
# (scripts/props-long.sh).
# ---------------------------------------------------------------------------
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - the test extras install it
    pass
else:
    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile(
        "ci", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 400)), stateful_step_count=60,
        deadline=None, suppress_health_check=_SLOW_OK, print_blob=True,
    )
    settings.register_profile(
        "long", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 10_000_000)), stateful_step_count=120,
        deadline=None, suppress_health_check=_SLOW_OK, print_blob=True,
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
