#!/bin/sh
# Install what the second-kernel test lane (tests/kernel_lane/) needs on Debian 12:
# Debian's stock 6.1 kernel (8021q, ppp, pppoe, nf_flow_table, 9p as modules; BTF),
# qemu for software emulation, busybox-static (virtme-ng's initramfs), ppp + pppoe
# (pppd and pppoe-server run inside the guest from the shared root fs), and virtme-ng.
#
# Idempotent: skips what is already there. Safe beside the running kernel: the
# kernel package only adds files under /boot and /lib/modules.
#
#   sudo scripts/setup-kernel-lane.sh            # install
#   KERNEL_LANE_PYTHON=/path/to/python scripts/setup-kernel-lane.sh
#
# Environment:
#   KERNEL_LANE_PYTHON  python whose pip gets virtme-ng (default: python3 on PATH)
#   KERNEL_LANE_KPKG    exact kernel package to install (default: see pick_kernel)
#   KERNEL_LANE_CACHE   directory kept between CI runs: the kernel .deb (~70 MB) is
#                       copied there after download and installed from there next time
#                       (default: ${XDG_CACHE_HOME:-$HOME/.cache}/ebpf-offloader/kernel-lane)
set -eu

PREFERRED_KPKG="linux-image-6.1.0-56-amd64"
CACHE="${KERNEL_LANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ebpf-offloader/kernel-lane}"
PY="${KERNEL_LANE_PYTHON:-$(command -v python3 || command -v python)}"

log() { printf 'setup-kernel-lane: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
else
    SUDO=""
fi

have_kernel() {
    ls /boot/vmlinuz-6.1.0-*-amd64 >/dev/null 2>&1
}

# Pick the kernel package: the preferred one if the archive has it, else the
# newest linux-image-6.1.*-amd64 that is neither -cloud, -rt nor -dbg/-unsigned.
pick_kernel() {
    if [ -n "${KERNEL_LANE_KPKG:-}" ]; then
        echo "$KERNEL_LANE_KPKG"; return
    fi
    if apt-cache policy "$PREFERRED_KPKG" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        echo "$PREFERRED_KPKG"; return
    fi
    apt-cache search --names-only '^linux-image-6\.1\.[0-9.-]*-amd64$' 2>/dev/null \
        | awk '{print $1}' | grep -v -e cloud -e '-rt-' -e dbg -e unsigned \
        | sort -V | tail -n 1
}

need_pkgs=""
for p in busybox-static qemu-system-x86 ppp pppoe; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        need_pkgs="$need_pkgs $p"
    fi
done

if ! have_kernel || [ -n "$need_pkgs" ]; then
    log "apt-get update"
    $SUDO apt-get update -qq
    if ! have_kernel; then
        kpkg="$(pick_kernel)"
        if [ -z "$kpkg" ]; then
            log "no linux-image-6.1.*-amd64 package in the apt sources"; exit 1
        fi
        log "kernel package: $kpkg"
        # shellcheck disable=SC2012
        cached="$(ls "$CACHE/${kpkg}"_*_amd64.deb 2>/dev/null | sort -V | tail -n 1 || true)"
        if [ -n "$cached" ]; then
            log "kernel from cache: $cached"
            need_pkgs="$need_pkgs $cached"   # apt-get installs a local .deb given by path
        else
            need_pkgs="$need_pkgs $kpkg"
        fi
    fi
    log "installing:$need_pkgs"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need_pkgs
else
    log "kernel and packages already installed"
fi

# keep the kernel .deb for the next run (CI: persist $CACHE)
if mkdir -p "$CACHE" 2>/dev/null; then
    for deb in /var/cache/apt/archives/linux-image-6.1.0-*-amd64_*_amd64.deb; do
        case "$deb" in *cloud*|*'*'*) continue ;; esac
        [ -e "$CACHE/$(basename "$deb")" ] || cp "$deb" "$CACHE/" 2>/dev/null || true
    done
fi

if ! "$PY" -c 'import importlib.metadata as m; m.version("virtme-ng")' >/dev/null 2>&1; then
    log "pip install virtme-ng into $PY"
    "$PY" -m pip install -q virtme-ng
fi

# vng must be on PATH (it calls virtme-run); pyenv needs a rehash to create shims.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi
vng_dir="$(dirname "$PY")"
if ! command -v vng >/dev/null 2>&1 && [ ! -x "$vng_dir/vng" ]; then
    log "vng not found on PATH nor beside $PY"; exit 1
fi

# shellcheck disable=SC2012
k="$(ls /boot/vmlinuz-6.1.0-*-amd64 | sort -V | tail -n 1)"
log "ready: $k, $(command -v qemu-system-x86_64), vng $("$PY" -c 'import importlib.metadata as m; print(m.version("virtme-ng"))')"
