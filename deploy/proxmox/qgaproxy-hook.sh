#!/bin/sh
# Proxmox VE hookscript: put qgaproxy in front of a VM's guest agent channel
# while Proxmox keeps using the agent (qm agent, backups' fsfreeze, the IP
# addresses in the GUI, shutdown through the agent) through the proxy.
#
#   cp deploy/proxmox/qgaproxy-hook.sh /var/lib/vz/snippets/   # a storage with "snippets" content
#   chmod 0755 /var/lib/vz/snippets/qgaproxy-hook.sh
#   qm set 100 --agent 1 --hookscript local:snippets/qgaproxy-hook.sh
#
# How: with `agent: 1` Proxmox starts QEMU with
#   -chardev socket,path=/var/run/qemu-server/100.qga,server=on,wait=off,id=qga0
# and its own tools connect to that path, one connection per command.  After
# QEMU started (post-start) this script renames QEMU's listening socket to
# /run/qgaproxy/100.qemu.qga (a renamed socket file still reaches the same
# listening socket) and starts qgaproxy@100, which connects there and
# serves clients at the old path, /var/run/qemu-server/100.qga: Proxmox's
# tools now talk to the proxy, like every other client.  Other clients may
# also use /var/run/qemu-server/100.qga (root only, as before).
#
# Phases (Proxmox calls the script with VMID PHASE):
#   post-start  write /etc/qgaproxy/VMID.toml if missing, rename the
#               socket, start qgaproxy@VMID
#   pre-stop    nothing (the proxy keeps serving while the guest shuts down)
#   post-stop   stop qgaproxy@VMID (QEMU removed the path when it exited)
#
# Environment (for tests; Proxmox sets none of these):
#   QEMU_SERVER_RUN (/var/run/qemu-server), QGAPROXY_RUN (/run/qgaproxy),
#   QGAPROXY_ETC (/etc/qgaproxy), SYSTEMCTL (systemctl)
set -eu

vmid=${1:?usage: $0 VMID PHASE}
phase=${2:?usage: $0 VMID PHASE}
qemu_run=${QEMU_SERVER_RUN:-/var/run/qemu-server}
proxy_run=${QGAPROXY_RUN:-/run/qgaproxy}
etc=${QGAPROXY_ETC:-/etc/qgaproxy}
systemctl=${SYSTEMCTL:-systemctl}

qga="$qemu_run/$vmid.qga"
moved="$proxy_run/$vmid.qemu.qga"
conf="$etc/$vmid.toml"

log() { echo "qgaproxy-hook: VM $vmid: $*" >&2; }

case "$phase" in
post-start)
    if [ ! -S "$qga" ]; then
        log "no agent socket $qga (agent: 1 not set?); nothing to do"
        exit 0
    fi
    mkdir -p "$proxy_run" "$etc"
    if [ ! -e "$conf" ]; then
        cat > "$conf" <<EOF
# Written by qgaproxy-hook.sh for Proxmox VM $vmid; edit freely.
[[agent]]
name = "$vmid"
# QEMU's own socket, renamed by the hookscript at post-start.
upstream = "unix:$moved"
  [[agent.listener]]
  # Where Proxmox (qm agent, vzdump, pvestatd) expects the agent.
  path = "$qga"
  mode = "0600"
EOF
        log "wrote $conf"
    fi
    # Rename QEMU's socket (same file system: /run); the proxy then creates
    # its own socket at the old path.
    mv -f "$qga" "$moved"
    if ! $systemctl start "qgaproxy@$vmid.service"; then
        log "qgaproxy@$vmid failed to start; giving QEMU's socket back"
        mv -f "$moved" "$qga" || true
        exit 0
    fi
    log "agent channel now served by qgaproxy@$vmid at $qga"
    ;;
post-stop)
    $systemctl stop "qgaproxy@$vmid.service" || true
    rm -f "$moved"
    ;;
pre-start|pre-stop)
    ;;
*)
    log "unknown phase $phase"
    ;;
esac
exit 0
