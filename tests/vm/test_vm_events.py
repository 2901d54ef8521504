"""agent-events with the real VM: the agent stopped in the guest and
started again reaches a negotiated client as AGENT_UNAVAILABLE then
AGENT_AVAILABLE; a client that did not select the capability gets none."""

from __future__ import annotations

import pytest
import trio

from proxyutil import Client, run_proxy, wait_ready
from qgaproxy.upstream import State

pytestmark = pytest.mark.vm


async def test_agent_events_from_a_real_guest(vm):
    async with run_proxy("unix:%s" % vm.agent_sock, request_timeout=2, sync_timeout=1) as proxy:
        with trio.fail_after(60):
            await wait_ready(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as fan, await Client.connect(path) as plain:
            await fan.call("request-negotiation")
            assert await fan.call("qmp_capabilities", {"enable": ["agent-events"]}) == {"return": {}}
            await trio.to_thread.run_sync(vm.control, "agent-stop")
            # silence is all the host sees: a request times out, the sync
            # goes unanswered, the agent is unavailable
            reply = await plain.call("guest-ping", id=1)
            assert "timed out" in reply["error"]["desc"]
            with trio.fail_after(30):
                event = await fan.reply()
            assert event["event"] == "AGENT_UNAVAILABLE"
            await trio.to_thread.run_sync(vm.control, "agent-start")
            with trio.fail_after(60):
                event = await fan.reply()
            assert event["event"] == "AGENT_AVAILABLE" and event["data"]["version"].startswith("7.2")
            assert proxy.upstream.state is State.READY
            assert await plain.call("guest-ping", id=2) == {"return": {}, "id": 2}
            assert plain.buf == b""
