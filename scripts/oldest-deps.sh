#!/bin/sh
# The oldest end of the dependency range that pyproject.toml declares, which is
# what OpenWrt 24.10 and 25.12 ship (python3-pyroute2 0.7.9, python3-cffi
# 1.16.0): a clean virtual environment with exactly those lower bounds and the
# test tools, the project installed the way a user does (`pip install .`, not
# editable: the wheel carries the BPF object), then the unit and integration
# suites and the lab. Run by .ci/run after the main suite (current releases);
# exits non-zero when anything fails, and with CI=true a skipped test fails too.
#
#   scripts/oldest-deps.sh [VENV]     (default /tmp/ebpf-offloader-oldest)
#
# Needs what scripts/setup.sh installs, and root for the integration suite
# and the lab.
set -eu
cd "$(dirname "$0")/.."
export CI="${CI:-true}"
unset PYTHONPATH  # the venv sees only what is installed in it (and the checkout, for the tests)
venv="${1:-/tmp/ebpf-offloader-oldest}"
repo="$PWD"

# The pins are the declared lower bounds ("name>=X" becomes "name==X"), so this
# run proves the range pyproject.toml states; the test tools are the "test"
# extra without the linters (they check the code, not the dependencies).
pins=$(python3 - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = []
for req in project["dependencies"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)(,.*)?", req)
    if not m:
        raise SystemExit(f"pyproject.toml: dependency {req!r} has no lower bound")
    pins.append(f"{m[1]}=={m[2]}")
tools = [r for r in project["optional-dependencies"]["test"]
         if re.match(r"[A-Za-z0-9_.-]+", r)[0] not in ("ruff", "mypy")]
print(" ".join(pins + tools))
EOF
)
echo "== oldest dependencies: $pins"
start=$(date +%s)

python3 -m venv --clear "$venv"
py="$venv/bin/python"
# shellcheck disable=SC2086
"$py" -m pip install -q $pins
"$py" -m pip install -q --no-deps .
"$py" -m pip check    # the pins satisfy what the installed package declares
"$py" - <<'EOF'
import importlib.metadata as md
print("   " + ", ".join(f"{n} {md.version(n)}" for n in ("pyroute2", "cffi", "ebpf-offloader")))
EOF

# The installed package, run from outside the checkout, finds the object
# that its wheel carries.
(cd / && "$py" -c "
import sys
from offloader.datapath import find_object
path = find_object()
print('   BPF object:', path)
sys.exit(0 if path.startswith('$venv/') or path.startswith('/lib/bpf/') else 1)
")

echo "== oldest dependencies: unit tests and the integration modules that use pyroute2"
# Run from the checkout, so the tests import this tree's offloader (pytest puts
# the checkout first on sys.path, and the agents they start inherit it). The
# integration modules are those whose paths go through pyroute2 (conntrack
# queries, routes and rules with marks, neighbours, FDB, links, ethtool): the
# rest (early drop, campaign, control socket) run on the newest releases only,
# to keep CI under its 30 minutes. Of test_offload.py, these cases run on the
# newest releases only (about 40 s here), each because its calls into pyroute2
# are ones the cases kept here make too:
# - test_transfer_is_offloaded_and_intact[xdp-*]: the same route, neighbour,
#   conntrack and NAT-tuple calls as its [tc-*] twin (kept); only the attach
#   differs, and XDP attach runs in every other XDP test here and in the lab
#   below, which also repeats these transfers with XDP (payload checked);
# - test_sigkill_fail_safe_and_restart: the fail-safe is the datapath's own
#   heartbeat (no netlink); the restart is an agent start, as in every test,
#   and test_restart_adopts_pinned_flows (kept) restarts an agent over pins;
# - test_sighup_reload_applies_new_exclusions: the uci file and the agent's own
#   policy; the hand back it causes is the map deletion and conntrack lookup
#   of test_fin_hands_the_flow_back and test_conntrack_delete_removes_offload;
# - test_status_without_agent_says_so: the control-socket client, which
#   imports no pyroute2.
# Of test_multiwan.py and test_roaming.py, the [xdp] twins run on the newest
# releases only (about 60 s here, the module's XDP topology and agent start
# included): their pyroute2 calls (rules with a mark, route lookups with mark
# and input device, conntrack marks; FDB and neighbour events and lookups) are
# those of their [tc] twins, which run here; only the attach differs (libbpf's,
# and pyroute2's ethtool and link calls for XDP, which the XDP cases of
# test_offload.py kept here and the lab below make).
# Of the unit tests, tests/unit/test_packaging.py::test_wheel_carries_the_bpf_object
# (about 20 s: it builds a wheel with pip) runs on the newest releases only: this
# script has just built and installed that wheel (`pip install .` above) and
# checked that the installed package finds the object the wheel carries.
set -f  # the test ids below have brackets: no globbing
newest_only="test_sigkill_fail_safe_and_restart test_sighup_reload_applies_new_exclusions
test_status_without_agent_says_so"
for c in tcp4-masq udp4-masq tcp6-masq udp6-masq tcp4-dnat udp4-dnat tcp6-dnat; do
	newest_only="$newest_only test_transfer_is_offloaded_and_intact[xdp-$c]"
done
deselect="--deselect tests/unit/test_packaging.py::test_wheel_carries_the_bpf_object"
for t in $newest_only; do
	deselect="$deselect --deselect tests/integration/test_offload.py::$t"
done
for c in tcp-host1 tcp-host2 udp-host1 udp-host2; do
	deselect="$deselect --deselect tests/integration/test_multiwan.py::test_each_host_leaves_by_its_own_uplink[xdp-$c]"
done
for t in test_multiwan.py::test_a_changed_connection_mark_moves_the_connection_as_the_kernel_does \
	test_multiwan.py::test_a_per_packet_mark_keeps_the_flow_with_the_kernel \
	test_roaming.py::test_host_roams_to_another_bridge_port test_roaming.py::test_next_hop_mac_changes; do
	deselect="$deselect --deselect tests/integration/$t[xdp]"
done
# shellcheck disable=SC2086
"$py" -m pytest -q -p no:cacheprovider tests/unit tests/openwrt \
	tests/integration/test_offload.py tests/integration/test_conntrack.py \
	tests/integration/test_multiwan.py tests/integration/test_roaming.py $deselect
set +f

echo "== oldest dependencies: the lab (ebpf-offloader lab, the installed command)"
(cd / && "$venv/bin/ebpf-offloader" lab)

echo "== oldest dependencies: passed in $(( $(date +%s) - start )) s ($repo)"
