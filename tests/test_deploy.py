"""deploy/: the systemd units, the Kubernetes sidecar, the libvirt domain,
the Proxmox hookscript and the container recipe.

External tools (systemd-analyze, systemd-sysusers, virt-xml-validate) and
PyYAML are skipped when missing, except under CI=true, where a missing one
is a failure: CI must check what the README promises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNITS = ["qgaproxy@.service", "qgaproxy.service"]
DROPINS = sorted((SYSTEMD / "dropins").glob("*.conf"))
SIDECAR = DEPLOY / "kubernetes" / "qgaproxy-sidecar.yaml"
LIBVIRT_XML = DEPLOY / "libvirt" / "vm1.xml"
LIBVIRT_TOML = DEPLOY / "libvirt" / "vm1.toml"
HOOK = DEPLOY / "proxmox" / "qgaproxy-hook.sh"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
INSTALLED_PATH = "/usr/local/bin/qgaproxy"
IN_CI = os.environ.get("CI") == "true"


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail("%s is required under CI=true (see deploy/README.md)" % name)
        pytest.skip("%s is not installed" % name)
    return path


def need_yaml():
    try:
        import yaml
    except ImportError:
        if IN_CI:
            pytest.fail("PyYAML (the `test` extra) is required under CI=true")
        pytest.skip("PyYAML is not installed (pip install -e '.[test]')")
    return yaml


# -- systemd ---------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every assignment, in order (empty resets kept)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, "not a unit line: %r" % raw
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, list[str]]:
    return unit_settings((SYSTEMD / name).read_text())["Service"]


def last(settings: dict[str, list[str]], key: str) -> str:
    assert key in settings, "%s= is missing" % key
    return settings[key][-1]


def with_installed_binary(text: str) -> str:
    """The unit as it would be with the console script where it is here:
    systemd-analyze verify checks that ExecStart= exists and is executable."""
    binary = shutil.which("qgaproxy")
    if binary is None:
        pytest.fail("the qgaproxy console script is not on PATH (pip install -e .)")
    return text.replace(INSTALLED_PATH, binary)


def verify(tmp_path: Path, name: str, text: str) -> None:
    analyze = need_tool("systemd-analyze")
    path = tmp_path / name
    path.write_text(with_installed_binary(text))
    run = subprocess.run(
        [analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=120
    )
    stem = name.split("@")[0].removesuffix(".service")
    output = (run.stdout + run.stderr).splitlines()
    about_unit = [line for line in output if stem in line]
    assert run.returncode == 0 and not about_unit, "systemd-analyze verify %s:\n%s" % (name, "\n".join(output))


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies(tmp_path, name):
    text = (SYSTEMD / name).read_text()
    verify(tmp_path, name, text)
    if "@" in name:  # an instance, with %i expanded
        verify(tmp_path, name.replace("@", "@vm1"), text)


@pytest.mark.parametrize("dropin", DROPINS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", UNITS)
def test_unit_with_dropin_verifies(tmp_path, name, dropin):
    # Appending a drop-in to the unit is how systemd reads it (later
    # assignments win or add, empty ones reset).
    merged = (SYSTEMD / name).read_text() + "\n" + dropin.read_text()
    verify(tmp_path, name.replace("@", "@vm1"), merged)


def test_dropins_exist():
    assert {p.name for p in DROPINS} >= {"libvirt.conf", "proxmox.conf", "serial.conf", "chown.conf"}


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "RuntimeDirectory": "qgaproxy",
    "RuntimeDirectoryPreserve": "yes",
    "Restart": "on-failure",
    "Type": "notify",
    "User": "qgaproxy",
}


@pytest.mark.parametrize("name", UNITS)
def test_unit_hardening(name):
    settings = service(name)
    for key, value in HARDENING.items():
        assert last(settings, key) == value, "%s: %s=%s, want %r" % (name, key, last(settings, key), value)
    families = set(last(settings, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_VSOCK"}
    assert last(settings, "AmbientCapabilities") == ""
    # systemd 252 (Debian 12) has no Type=notify-reload: reload by signal.
    assert settings["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    # Longer than the proxy's drain (shutdown_grace, 2 s by default).
    stop = last(settings, "TimeoutStopSec")
    assert re.fullmatch(r"\d+s", stop) and int(stop[:-1]) >= 10


def test_unit_commands():
    instance = service("qgaproxy@.service")
    assert instance["ExecStart"] == [INSTALLED_PATH + " serve --config /etc/qgaproxy/%i.toml"]
    assert instance["ExecStartPre"] == [INSTALLED_PATH + " check-config /etc/qgaproxy/%i.toml"]
    host = service("qgaproxy.service")
    assert host["ExecStart"] == [INSTALLED_PATH + " serve --config /etc/qgaproxy/qgaproxy.toml"]
    assert host["ExecStartPre"] == [INSTALLED_PATH + " check-config /etc/qgaproxy/qgaproxy.toml"]
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        # the file says where the binary may really be
        assert "virtualenv" in text and "command -v qgaproxy" in text


def test_unit_exec_start_matches_the_cli():
    """The subcommands and flags the units use exist."""
    from qgaproxy import cli

    parser = cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse has no API for it)
    assert {"serve", "check-config"} <= set(subcommands)
    assert "--config" in subcommands["serve"]._option_string_actions  # noqa: SLF001


@pytest.mark.parametrize("name", UNITS)
def test_unit_security_exposure(name):
    analyze = need_tool("systemd-analyze")
    run = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(SYSTEMD / name)],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout + run.stderr)
    assert match, run.stdout + run.stderr
    # 1.9 measured with systemd 252; "OK" ends at 4.9.
    assert float(match.group(1)) <= 2.5, run.stdout


def test_sysusers(tmp_path):
    sysusers = need_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    run = subprocess.run(
        [sysusers, "--root=%s" % tmp_path, str(SYSTEMD / "qgaproxy.sysusers")],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^qgaproxy:x:\d+:\d+:", passwd, re.M)
    assert re.search(r"^kvm:x:\d+:.*\bqgaproxy\b", group, re.M)


def test_memory_deny_write_execute_is_fine_for_python(tmp_path):
    """MemoryDenyWriteExecute=yes, checked the kernel's way: PR_SET_MDWE
    (Linux 6.3+) refuses writable+executable mappings like the unit's
    seccomp filter does; the proxy must serve under it."""
    probe = (
        "import ctypes,os,sys\n"
        "libc=ctypes.CDLL(None,use_errno=True)\n"
        "if libc.prctl(65,1,0,0,0)!=0: sys.exit(77)\n"
        "os.execv(sys.executable,[sys.executable,'-m','qgaproxy']+sys.argv[1:])\n"
    )
    sock = tmp_path / "mdwe.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", probe, "serve", "--upstream", "sim", "--listen", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                if proc.returncode == 77:
                    pytest.skip("this kernel has no PR_SET_MDWE")
                pytest.fail("the proxy died under MDWE:\n" + proc.stdout.read().decode())
            assert time.monotonic() < deadline, "no socket after 20 s"
            time.sleep(0.05)
        reply = b""
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(sock))
            client.sendall(b'{"execute":"guest-info","id":"mdwe"}')
            while not reply.endswith(b"\n"):
                chunk = client.recv(65536)
                if not chunk:
                    break
                reply += chunk
        answer = json.loads(reply)
        assert answer["id"] == "mdwe" and "version" in answer["return"]
    finally:
        proc.terminate()
        proc.wait(20)


# -- Kubernetes ------------------------------------------------------------


def sidecar_docs():
    yaml = need_yaml()
    docs = [d for d in yaml.safe_load_all(SIDECAR.read_text()) if d]
    by_kind = {}
    for doc in docs:
        assert doc["kind"] not in by_kind
        by_kind[doc["kind"]] = doc
    assert set(by_kind) == {"ConfigMap", "Pod"}
    return by_kind["ConfigMap"], by_kind["Pod"]


def sidecar_toml(configmap) -> dict:
    return tomllib.loads(configmap["data"]["qgaproxy.toml"])


def pod_containers(pod) -> dict:
    spec = pod["spec"]
    every = spec.get("containers", []) + spec.get("initContainers", [])
    return {c["name"]: c for c in every}


def mount_of(container, volume: str) -> dict:
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(mounts) == 1, "%s does not mount %s" % (container["name"], volume)
    return mounts[0]


def test_sidecar_config_has_every_key():
    configmap, _ = sidecar_docs()
    config = sidecar_toml(configmap)
    assert config["log"]["level"] in ("debug", "info", "warning", "error")
    assert config["log"]["format"] in ("plain", "json")
    host, _, port = config["metrics"]["listen"].rpartition(":")
    assert host and port.isdigit()
    assert set(config["defaults"]) >= {
        "request_timeout", "sync_timeout", "window", "backoff_min", "backoff_max",
        "max_message_size", "client_backlog", "client_write_timeout", "shutdown_grace",
        "command_timeouts",
    }
    assert config["defaults"]["command_timeouts"]["guest-fsfreeze-freeze"] == 3600
    (agent,) = config["agent"]
    assert agent["name"] and agent["upstream"].startswith("unix-listen:")
    (listener,) = agent["listener"]
    assert listener["path"].endswith(".sock") and listener["mode"] == "0660"


def test_sidecar_config_is_accepted_by_the_proxy():
    config_module = pytest.importorskip("qgaproxy.config")
    configmap, _ = sidecar_docs()
    config = config_module.parse(sidecar_toml(configmap))
    assert [a.name for a in config.agents] == ["vm1"]


def test_sidecar_shares_the_socket_volume():
    configmap, pod = sidecar_docs()
    config = sidecar_toml(configmap)
    containers = pod_containers(pod)
    proxy, qemu = containers["qgaproxy"], containers["qemu"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes["qga-sockets"]
    proxy_dir = mount_of(proxy, "qga-sockets")["mountPath"]
    qemu_dir = mount_of(qemu, "qga-sockets")["mountPath"]
    assert proxy_dir == qemu_dir
    (agent,) = config["agent"]
    upstream = agent["upstream"].partition(":")[2]
    assert os.path.dirname(upstream) == proxy_dir
    assert all(os.path.dirname(l["path"]) == proxy_dir for l in agent["listener"])
    # QEMU connects to exactly that socket and names the port for qemu-ga.
    args = qemu["command"] + qemu["args"]
    chardev = [a for a in args if a.startswith("socket,") and "path=" + upstream in a]
    assert len(chardev) == 1 and "server=off" in chardev[0] and "reconnect=" in chardev[0]
    chardev_id = re.search(r"id=([^,]+)", chardev[0]).group(1)
    assert "virtserialport,chardev=%s,name=org.qemu.guest_agent.0" % chardev_id in args
    # The configuration is the ConfigMap, where the image's CMD looks for it.
    config_mount = mount_of(proxy, "qgaproxy-config")
    assert config_mount.get("readOnly") is True
    assert volumes["qgaproxy-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert proxy["args"] == ["serve", "--config", config_mount["mountPath"] + "/qgaproxy.toml"]


def test_sidecar_probes():
    configmap, pod = sidecar_docs()
    proxy = pod_containers(pod)["qgaproxy"]
    metrics_port = int(sidecar_toml(configmap)["metrics"]["listen"].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports["metrics"] == metrics_port
    for probe in ("readinessProbe", "livenessProbe"):
        assert proxy[probe]["tcpSocket"]["port"] in ("metrics", metrics_port), probe
    # the metrics must listen where the kubelet can reach them
    assert sidecar_toml(configmap)["metrics"]["listen"].startswith("0.0.0.0:")


def test_sidecar_is_locked_down():
    configmap, pod = sidecar_docs()
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > sidecar_toml(configmap)["defaults"]["shutdown_grace"]
    for name, container in pod_containers(pod).items():
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        assert "add" not in context["capabilities"], name
        assert context.get("privileged", False) is False, name
        assert context.get("runAsUser", 1) != 0, name
    proxy = pod_containers(pod)["qgaproxy"]
    resources = proxy["resources"]
    assert set(resources["requests"]) >= {"cpu", "memory"}
    assert set(resources["limits"]) >= {"memory"}


# -- container image -------------------------------------------------------


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    copied = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    for source in copied:
        assert (ROOT / source).exists(), source
    # what the package build needs: the metadata file and what it names
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "pyproject.toml" in copied and project["readme"] in copied and "qgaproxy" in copied
    assert "qgaproxy" in project["scripts"]
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert user and int(user.group(1)) != 0
    assert re.search(r'^ENTRYPOINT \["qgaproxy"\]$', text, re.M)
    assert 'CMD ["serve", "--config", "/etc/qgaproxy/qgaproxy.toml"]' in text


# -- libvirt ---------------------------------------------------------------

QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def test_libvirt_xml_validates():
    validate = need_tool("virt-xml-validate")
    run = subprocess.run([validate, str(LIBVIRT_XML), "domain"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_libvirt_domain_leaves_the_channel_to_the_proxy():
    domain = ET.parse(LIBVIRT_XML).getroot()
    # no channel libvirt would take for its own agent
    for channel in domain.iter("channel"):
        target = channel.find("target")
        assert target is None or target.get("name") != "org.qemu.guest_agent.0"
    controllers = [c for c in domain.iter("controller") if c.get("type") == "virtio-serial"]
    assert [c.get("index") for c in controllers] == ["0"]
    args = [a.get("value") for a in domain.iter(QEMU_NS + "arg")]
    chardev = args[args.index("-chardev") + 1]
    device = json.loads(args[args.index("-device") + 1])
    assert device["driver"] == "virtserialport"
    assert device["bus"] == "virtio-serial0.0"
    assert device["name"] == "org.qemu.guest_agent.0"
    assert "id=%s," % device["chardev"] in chardev
    assert "server=off" in chardev and "reconnect=" in chardev
    # ...and it connects where the proxy listens
    config = tomllib.loads(LIBVIRT_TOML.read_text())
    (agent,) = config["agent"]
    kind, _, path = agent["upstream"].partition(":")
    assert kind == "unix-listen" and "path=%s," % path in chardev
    assert agent["listener"][0]["group"] == "qgaproxy"
    # the AppArmor rule covers that path
    rule = [l for l in (DEPLOY / "libvirt" / "apparmor-libvirt-qemu").read_text().splitlines() if l and l[0] != "#"]
    assert rule == ["/run/qgaproxy/*.qga rw,"]
    assert re.fullmatch(r"/run/qgaproxy/[^/]+\.qga", path)


# -- Proxmox ---------------------------------------------------------------


@pytest.fixture
def pve(tmp_path):
    """The hookscript's directories, and a systemctl that logs its calls."""
    dirs = {name: tmp_path / name for name in ("qemu-server", "qgaproxy", "etc")}
    dirs["qemu-server"].mkdir()
    calls = tmp_path / "systemctl.calls"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text('#!/bin/sh\necho "$@" >> %s\nexit ${FAKE_SYSTEMCTL_RC:-0}\n' % calls)
    systemctl.chmod(0o755)
    env = dict(
        os.environ,
        QEMU_SERVER_RUN=str(dirs["qemu-server"]),
        QGAPROXY_RUN=str(dirs["qgaproxy"]),
        QGAPROXY_ETC=str(dirs["etc"]),
        SYSTEMCTL=str(systemctl),
    )
    return dirs, calls, env


def hook(env, *args, **extra):
    run = subprocess.run(["sh", str(HOOK), *args], env={**env, **extra}, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run


def test_proxmox_hook_puts_the_proxy_in_front(pve):
    dirs, calls, env = pve
    assert os.access(HOOK, os.X_OK)
    qga = dirs["qemu-server"] / "100.qga"
    qemu = socket.socket(socket.AF_UNIX)  # QEMU's listening agent socket
    qemu.bind(str(qga))
    qemu.listen(1)
    try:
        hook(env, "100", "pre-start")
        hook(env, "100", "post-start")
        moved = dirs["qgaproxy"] / "100.qemu.qga"
        assert not qga.exists()
        assert stat.S_ISSOCK(moved.stat().st_mode)
        # the renamed file still reaches QEMU's listening socket
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(moved))
            qemu.settimeout(5)
            qemu.accept()[0].close()
        assert calls.read_text().split("\n")[0] == "start qgaproxy@100.service"
        # the configuration it wrote: upstream = QEMU's socket, listener = Proxmox's path
        config = tomllib.loads((dirs["etc"] / "100.toml").read_text())
        (agent,) = config["agent"]
        assert agent["name"] == "100"
        assert agent["upstream"] == "unix:%s" % moved
        assert agent["listener"][0]["path"] == str(qga)
        assert agent["listener"][0]["mode"] == "0600"
        config_module = pytest.importorskip("qgaproxy.config")
        config_module.parse(config)
        # an edited file is kept
        (dirs["etc"] / "100.toml").write_text("# mine\n")
        hook(env, "100", "post-stop")
        assert calls.read_text().splitlines()[-1] == "stop qgaproxy@100.service"
        assert not moved.exists()
        moved_back = dirs["qemu-server"] / "101.qga"
        qemu2 = socket.socket(socket.AF_UNIX)
        qemu2.bind(str(moved_back))
        qemu2.listen(1)
        hook(env, "101", "post-start")
        hook(env, "100", "post-start")  # no socket: nothing to do
        assert (dirs["etc"] / "100.toml").read_text() == "# mine\n"
        qemu2.close()
    finally:
        qemu.close()


def test_proxmox_hook_gives_the_socket_back_if_the_proxy_fails(pve):
    dirs, calls, env = pve
    qga = dirs["qemu-server"] / "100.qga"
    qemu = socket.socket(socket.AF_UNIX)
    qemu.bind(str(qga))
    qemu.listen(1)
    try:
        run = hook(env, "100", "post-start", FAKE_SYSTEMCTL_RC="1")
        assert "giving QEMU's socket back" in run.stderr
        assert stat.S_ISSOCK(qga.stat().st_mode)
        assert not (dirs["qgaproxy"] / "100.qemu.qga").exists()
    finally:
        qemu.close()


def test_proxmox_hook_without_agent(pve):
    dirs, calls, env = pve
    run = hook(env, "200", "post-start")
    assert "nothing to do" in run.stderr
    assert not calls.exists()


# -- the README ------------------------------------------------------------


def test_readme_names_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(ROOT)) in readme, "deploy/README.md does not mention %s" % path
