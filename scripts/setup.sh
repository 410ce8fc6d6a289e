#!/bin/sh
# Set up a fresh Debian 12 machine for ebpf-offloader: system packages, the
# Python package with its test and bench extras, the BPF object. Idempotent.
set -eu
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=""
for pkg in clang llvm libbpf-dev libbpf1 bpftool cmake gcc libc6-dev linux-libc-dev \
           iproute2 nftables ethtool conntrack iperf3 shellcheck busybox procps kmod \
           iputils-ping python3-venv; do
	dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
		need="$need $pkg"
done
if [ -n "$need" ]; then
	$SUDO apt-get update -qq
	# shellcheck disable=SC2086
	$SUDO apt-get install -y -qq $need >/dev/null
fi

python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python3 -m pip install -q -e ".[test,bench]"

cmake -S . -B build >/dev/null
cmake --build build

# BPF filesystem for pinned maps in the root namespace (OpenWrt mounts it at boot).
if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
	$SUDO mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
fi
echo "setup done: build/offload.bpf.o"
