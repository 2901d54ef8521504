#!/usr/bin/env bash
# Build (and cache) a tiny QEMU guest that runs the real qemu-ga, for tests/vm.
#
#   bash tests/vm/build.sh            # build if needed, print the output paths
#   bash tests/vm/build.sh --force    # rebuild even if the cache is fresh
#
# Outputs, in ${QGAPROXY_VM_CACHE:-$HOME/.cache/qgaproxy-vm}:
#   vmlinuz      the kernel of the package linux-image-cloud-amd64 depends on
#                (downloaded with apt-get download, never installed)
#   initrd.img   an uncompressed newc cpio: static busybox, the host's qemu-ga
#                and the libraries ldd lists, the virtio modules, and /init
#   build-info   key=value lines: versions, module order, block list
# The work is skipped when all three exist and are newer than this script and
# than the host's qemu-ga.  Downloaded .debs stay in debs/ for rebuilds.
#
# Host packages installed when missing (apt, as root or via sudo):
#   qemu-system-x86 (to boot it), qemu-guest-agent (the agent copied in).
# busybox-static is downloaded and unpacked, not installed.
#
# Environment: QGAPROXY_VM_CACHE (cache dir), QGAPROXY_VM_KERNEL_META (the
# kernel meta package, default linux-image-cloud-amd64), QEMU_GA (agent
# binary, default /usr/sbin/qemu-ga).
#
# The guest (/init, below): mounts proc, sys, devtmpfs, tmpfs on /run and
# /tmp; loads the virtio modules; finds the virtio port named
# org.qemu.guest_agent.0 and runs `qemu-ga -m virtio-serial -p /dev/vportNpM`
# in a restart loop with dangerous commands blocked (guest-shutdown is NOT
# blocked: /sbin/shutdown powers the VM off); then reads commands on the
# serial console (see tests/vm/vm.py, VM.control):
#   [@TAG] ping | status | agent-stop | agent-start | agent-kill [SIG] |
#          agent-log | run SHELL-COMMAND... | help
# Each answer is framed by "QGAVM BEGIN TAG" and "QGAVM END TAG rc=N" lines
# (TAG is "-" when none was given).  Asynchronous lines start with
# "QGAVM EVENT ".  "QGAVM READY" is printed when init is done.
set -euo pipefail

SCRIPT=$(readlink -f "$0")
CACHE=${QGAPROXY_VM_CACHE:-$HOME/.cache/qgaproxy-vm}
KERNEL_META=${QGAPROXY_VM_KERNEL_META:-linux-image-cloud-amd64}
QEMU_GA=${QEMU_GA:-/usr/sbin/qemu-ga}
FORCE=0
case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

# Loaded in this order; each one must be a module of the kernel or built in.
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio virtio_console"
# Blocked inside the guest (shell patterns over `qemu-ga -b help`).
BLOCK_PATTERNS="guest-exec guest-exec-status guest-set-time guest-fsfreeze-* guest-suspend-*
guest-set-user-password guest-set-vcpus guest-set-memory-blocks guest-ssh-add-authorized-keys
guest-ssh-remove-authorized-keys guest-fstrim guest-file-write"

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        $SUDO apt-get update -qq
        apt_updated=1
    fi
}

# -- host packages ------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x "$QEMU_GA" ] || need+=(qemu-guest-agent)
if [ ${#need[@]} -gt 0 ]; then
    apt_update_once
    log "apt-get install ${need[*]}"
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -f /usr/share/qemu/qboot.rom ] || log "warning: /usr/share/qemu/qboot.rom missing (package qemu-system-data)"

# -- cache check ----------------------------------------------------------------
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # one build at a time (parallel test runs)

OUTPUTS=("$CACHE/vmlinuz" "$CACHE/initrd.img" "$CACHE/build-info")
fresh() {
    local f
    for f in "${OUTPUTS[@]}"; do
        [ -f "$f" ] && [ "$f" -nt "$SCRIPT" ] && [ "$f" -nt "$QEMU_GA" ] || return 1
    done
}
if [ "$FORCE" = 0 ] && fresh; then
    log "cached: $CACHE (up to date)"
    printf '%s\n' "${OUTPUTS[@]}"
    exit 0
fi

t0=$(date +%s.%N)
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DEBS="$CACHE/debs"
mkdir -p "$DEBS"

# -- downloads (kept in $DEBS; apt-get download names files by version) ---------
apt-cache show "$KERNEL_META" >/dev/null 2>&1 || apt_update_once
KPKG=$(apt-cache depends "$KERNEL_META" | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[ -n "$KPKG" ] || die "cannot find the linux-image package $KERNEL_META depends on"
download() {  # download PKG -> prints the path of its .deb
    local pkg=$1 ver f
    ver=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2 }')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no candidate version for $pkg"
    f=$(ls "$DEBS/${pkg}_${ver/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$f" ]; then
        log "apt-get download $pkg=$ver"
        # apt's sandbox user cannot write to a root-only directory; that is fine.
        (cd "$DEBS" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v -e 'unsandboxed' >&2 || true)
        f=$(ls "$DEBS/${pkg}_${ver/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
        [ -n "$f" ] || die "apt-get download $pkg=$ver failed"
    fi
    echo "$f"
}
KDEB=$(download "$KPKG")
BBDEB=$(download busybox-static)

log "unpacking $(basename "$KDEB") and $(basename "$BBDEB")"
dpkg-deb -x "$BBDEB" "$WORK/bb"
BB="$WORK/bb/bin/busybox"
[ -x "$BB" ] || die "no bin/busybox in $BBDEB"
dpkg-deb -x "$KDEB" "$WORK/k"
VMLINUZ=$(ls "$WORK"/k/boot/vmlinuz-* | head -n1)
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR="$WORK/k/lib/modules/$KVER"
[ -d "$MODDIR" ] || die "no /lib/modules/$KVER in $KDEB"

# -- the initramfs tree ----------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib64,etc/qgavm,proc,sys,dev,run,tmp,var,root}
ln -s ../run "$R/var/run"
ln -s ../tmp "$R/var/tmp"

install -m 0755 "$BB" "$R/bin/busybox"
# Applet links at build time (saves forks under TCG at boot).
"$BB" --list-full | while read -r p; do
    case "$p" in linuxrc|sbin/init) continue ;; esac
    [ -e "$R/$p" ] || [ -L "$R/$p" ] || ln -s /bin/busybox "$R/$p"
done

# qemu-ga, its libraries and the dynamic loader, at the paths ldd reports.
install -m 0755 "$QEMU_GA" "$R/usr/sbin/qemu-ga"
ldd "$QEMU_GA" | awk '/=> \//{ print $3 } /^\t\// { print $1 }' | while read -r lib; do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
done
[ -e "$R/lib64/ld-linux-x86-64.so.2" ] || die "dynamic loader not copied"

# Modules: uncompressed copies (busybox insmod may not read .ko.xz/.ko.zst).
loaded=""
builtin=""
for m in $MODULES; do
    f=$(find "$MODDIR/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
    if [ -n "$f" ]; then
        case "$f" in
            *.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
            *.zst) zstd -qdc "$f" >"$R/lib/modules/$m.ko" ;;
            *.gz) gzip -dc "$f" >"$R/lib/modules/$m.ko" ;;
            *) cp "$f" "$R/lib/modules/$m.ko" ;;
        esac
        loaded="$loaded $m"
    elif grep -q "/$m.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; then
        builtin="$builtin $m"
    else
        die "module $m is neither in $KPKG nor built in"
    fi
done
echo "$loaded" | tr ' ' '\n' | sed '/^$/d' >"$R/etc/qgavm/modules"

# Block list.
mapfile -t ALL_CMDS < <("$QEMU_GA" -b help)
blocked=()
for c in "${ALL_CMDS[@]}"; do
    for p in $BLOCK_PATTERNS; do
        # shellcheck disable=SC2254
        case "$c" in $p) blocked+=("$c"); break ;; esac
    done
done
BLOCK=$(IFS=,; echo "${blocked[*]}")
case ",$BLOCK," in *,guest-shutdown,*) die "guest-shutdown must stay enabled" ;; esac
for c in guest-exec guest-set-time guest-file-write; do
    case ",$BLOCK," in *",$c,"*) ;; *) die "$c not blocked (qemu-ga -b help changed?)" ;; esac
done
echo "$BLOCK" >"$R/etc/qgavm/blocklist"

cat >"$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo qgavm >"$R/etc/hostname"

# /sbin/shutdown, as qemu-ga's guest-shutdown runs it:
#   shutdown -P|-H|-r +0 "hypervisor initiated shutdown"
cat >"$R/sbin/shutdown" <<'EOF'
#!/bin/sh
mode=poweroff
for a in "$@"; do
    case "$a" in -r) mode=reboot ;; -H) mode=halt ;; -P) mode=poweroff ;; esac
done
echo "QGAVM EVENT shutdown mode=$mode" >/dev/console
sync
exec $mode -f
EOF
chmod 0755 "$R/sbin/shutdown"

cat >"$R/init" <<'EOF'
#!/bin/sh
# qgaproxy test VM: init (generated by tests/vm/build.sh; see the header there)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/qga /run/qgavm /dev/pts /dev/shm
hostname -F /etc/hostname
echo "QGAVM BOOT $(uname -r)"

for m in $(cat /etc/qgavm/modules); do
    insmod "/lib/modules/$m.ko" || echo "QGAVM ERROR insmod $m"
done

# The agent's port: /sys/class/virtio-ports/vportNpM/name = org.qemu.guest_agent.0
PORT=""
i=0
while [ $i -lt 300 ]; do
    for n in /sys/class/virtio-ports/*/name; do
        [ -r "$n" ] || continue
        read -r name <"$n"
        if [ "$name" = org.qemu.guest_agent.0 ]; then d=${n%/name}; PORT=/dev/${d##*/}; fi
    done
    [ -n "$PORT" ] && [ -c "$PORT" ] && break
    PORT=""
    sleep 0.1
    i=$((i + 1))
done
if [ -z "$PORT" ]; then
    echo "QGAVM ERROR no virtio port named org.qemu.guest_agent.0"
    ls -l /sys/class/virtio-ports/ /dev/vport* 2>&1
fi
echo "$PORT" >/run/qgavm/port
BLOCK=$(cat /etc/qgavm/blocklist)

agent_pid() {  # prints the running agent's pid, if any
    local p
    p=$(cat /run/qgavm/agent.pid 2>/dev/null) || return 1
    [ -n "$p" ] && [ -d "/proc/$p" ] && echo "$p"
}

# The restart loop: runs qemu-ga again whenever it exits, unless agent-stop
# created /run/qgavm/agent.stopped.
agent_loop() {
    while :; do
        if [ -e /run/qgavm/agent.stopped ] || [ -z "$PORT" ]; then
            sleep 0.1
            continue
        fi
        /usr/sbin/qemu-ga -m virtio-serial -p "$PORT" -t /run/qga \
            -f /run/qga/qemu-ga.pid -l /run/qga/qemu-ga.log -b "$BLOCK" \
            </dev/null >>/run/qga/stdout.log 2>&1 &
        pid=$!
        echo "$pid" >/run/qgavm/agent.pid
        echo "QGAVM EVENT agent-start pid=$pid" >/dev/console
        wait "$pid"
        rc=$?
        rm -f /run/qgavm/agent.pid
        echo "QGAVM EVENT agent-exit pid=$pid rc=$rc" >/dev/console
        sleep 0.05   # no hot loop if it cannot start
    done
}
# Its own output goes nowhere: the shell's job messages ("Killed") would mix
# with the control answers; events go to the console explicitly.
agent_loop >/dev/null 2>&1 &

status() {
    local p port f
    if p=$(agent_pid); then
        port=closed
        for f in /proc/"$p"/fd/*; do
            case "$(readlink "$f")" in /dev/vport*) port=open ;; esac
        done
        echo "agent running pid=$p port=$port"
    elif [ -e /run/qgavm/agent.stopped ]; then
        echo "agent stopped"
    else
        echo "agent down"   # between exit and restart
    fi
}

handle() {
    local cmd=$1 p i sig
    shift
    case "$cmd" in
    ping) echo pong ;;
    status) status ;;
    agent-stop)
        touch /run/qgavm/agent.stopped
        # TERM first, as a service manager stops it; a guest slowed down by
        # its host can keep qemu-ga from finishing in time, so after 5 s
        # (the guest's) it gets KILL, as systemd's stop does.
        i=0 sig=TERM
        while p=$(pidof qemu-ga); do
            kill -$sig $p 2>/dev/null
            i=$((i + 1))
            [ $i -gt 100 ] && sig=KILL
            [ $i -gt 200 ] && { echo "qemu-ga does not stop"; return 1; }
            sleep 0.05
        done
        status ;;
    agent-start)
        rm -f /run/qgavm/agent.stopped
        i=0
        until agent_pid >/dev/null; do
            i=$((i + 1))
            [ $i -gt 100 ] && { echo "qemu-ga does not start"; return 1; }
            sleep 0.05
        done
        status ;;
    agent-kill)
        sig=${1:-KILL}
        p=$(agent_pid) || { echo "agent not running"; return 1; }
        kill -"$sig" "$p" && echo "killed pid=$p sig=$sig" ;;
    agent-log) cat /run/qga/qemu-ga.log /run/qga/stdout.log 2>/dev/null ;;
    run) eval "$*" ;;
    help) echo "ping status agent-stop agent-start agent-kill [SIG] agent-log run CMD... help" ;;
    "") ;;
    *) echo "unknown command: $cmd"; return 127 ;;
    esac
}

stty -F /dev/ttyS0 -echo 2>/dev/null
CR=$(printf '\r')
echo "QGAVM READY port=$PORT"
set -f
while :; do
    if ! IFS= read -r line; then
        sleep 0.2
        continue
    fi
    line=${line%"$CR"}
    set -- $line
    tag=-
    case "${1:-}" in @*) tag=$1; shift ;; esac
    echo "QGAVM BEGIN $tag"
    rc=0
    set +f
    ( handle "$@" ) || rc=$?
    set -f
    echo "QGAVM END $tag rc=$rc"
done </dev/ttyS0
EOF
chmod 0755 "$R/init"

if [ "$(id -u)" = 0 ]; then
    mknod -m 0600 "$R/dev/console" c 5 1
    mknod -m 0666 "$R/dev/null" c 1 3
fi

# -- pack -------------------------------------------------------------------------
log "packing initramfs"
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | "$BB" cpio -o -H newc) >"$WORK/initrd.img" 2>"$WORK/cpio.err" \
    || { cat "$WORK/cpio.err" >&2; die "cpio failed"; }
cp "$VMLINUZ" "$WORK/vmlinuz"
{
    echo "kernel_package=$KPKG"
    echo "kernel=$KVER"
    echo "qemu_ga=$("$QEMU_GA" -V | awk '{ print $NF }')"
    echo "busybox=$("$BB" | head -n1 | awk '{ print $2 }')"
    echo "modules=$(echo $loaded)"
    echo "builtin_modules=$(echo $builtin)"
    echo "blocked=$BLOCK"
    echo "initrd_bytes=$(stat -c %s "$WORK/initrd.img")"
} >"$WORK/build-info"
mv -f "$WORK/vmlinuz" "$CACHE/vmlinuz"
mv -f "$WORK/initrd.img" "$CACHE/initrd.img"
mv -f "$WORK/build-info" "$CACHE/build-info"   # last: marks a complete build
t1=$(date +%s.%N)
log "built in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s: $CACHE"
printf '%s\n' "${OUTPUTS[@]}"
