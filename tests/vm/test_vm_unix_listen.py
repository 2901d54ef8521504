"""Real QEMU connecting to the proxy: the unix-listen upstream.

QEMU's chardev is a client (-chardev socket,path=P,server=off,reconnect=1)
and the proxy owns P, so nothing else can take QEMU's one agent connection
before the proxy does. After QEMU restarts, it connects again."""

from __future__ import annotations

import pytest
import trio

from proxyutil import Client, run_proxy
from qgaproxy.upstream import State
from vm import VM, require_vm

pytestmark = pytest.mark.vm


async def test_qemu_connects_to_the_proxy_and_reconnects_after_restart(vm_image, tmp_path):
    require_vm()
    upstream = tmp_path / "vm.qga"
    async with run_proxy("unix-listen:%s" % upstream, request_timeout=3) as proxy:
        assert upstream.exists()  # listening before QEMU starts
        vm = VM(agent_sock=upstream, agent_client=True)
        try:
            await trio.to_thread.run_sync(vm.start)
            with trio.fail_after(60):
                await proxy.wait_state(State.READY)
            async with await Client.connect(proxy.config.listen[0]) as client:
                for i in range(5):
                    assert await client.call("guest-ping", id=i) == {"return": {}, "id": i}
                info = await client.call("guest-info")
                assert info["return"]["version"].startswith("7.2")
                # QEMU goes away and comes back: it connects to us again
                await trio.to_thread.run_sync(vm.kill)
                with trio.fail_after(30):
                    await proxy.wait_state(State.CONNECTING)
                reply = await client.call("guest-ping", id="down")
                assert reply["error"]["desc"].startswith("Guest agent is not available")
                await trio.to_thread.run_sync(vm.restart)
                with trio.fail_after(60):
                    await proxy.wait_state(State.READY)
                assert await client.call("guest-ping", id="up") == {"return": {}, "id": "up"}
        finally:
            await trio.to_thread.run_sync(vm.close)
