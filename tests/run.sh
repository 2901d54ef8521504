#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need
# (the real guest agent and socat from Debian, the Python packages), then
# runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

need=()
[ -x /usr/sbin/qemu-ga ] || need+=(qemu-guest-agent)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v socat >/dev/null || need+=(socat)
command -v setpriv >/dev/null || need+=(util-linux)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
# prometheus and promtool (tests/test_prometheus.py); its postinst may not
# start the service in a container, which is harmless here.
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# The tiny VM the tests boot (a Debian kernel, busybox and the real
# qemu-ga in an initramfs), built once and cached.
bash tests/vm/build.sh
exec python3 -m pytest -q "$@"
