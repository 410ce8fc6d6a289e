"""The package's shell scripts: shellcheck, and behaviour under a stand-in library.

The init script runs inside harness/rc-common.sh, a stand-in for OpenWrt's
/etc/rc.common, /lib/functions.sh and procd.sh (OpenWrt's shell library does
not exist on Debian), which records the procd and config calls it makes.
Each behaviour test runs under BusyBox ash (OpenWrt's shell) and dash.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .owrt_sandbox import FILES, HARNESS, PROG, Run, Sandbox

SCRIPTS = sorted(p for p in FILES.iterdir() if p.read_bytes().startswith(b"#!/bin/sh"))

ENABLED = "config offloader 'main'\n\toption enabled '1'\n\toption hook 'tc'\n"
DISABLED = "config offloader 'main'\n\toption enabled '0'\n"


def test_every_script_is_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {
        "ebpf-offloader.init",
        "ebpf-offloader.hotplug",
        "ebpf-offloader.fw4-include",
        "ebpf-offloader.uci-defaults",
        "ebpf-offloader.rpcd",
    } <= names


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", [*SCRIPTS, HARNESS], ids=lambda p: p.name)
def test_shellcheck_sh_clean(script: Path) -> None:
    proc = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_variable_is_local(script: Path) -> None:
    """Scripts sourced into OpenWrt's shell (rc.common, hotplug-call) must not
    leave variables behind: every assignment inside a function is `local`."""
    text = script.read_text()
    assigned: set[str] = set()
    declared: set[str] = set()
    in_function = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("() {"):
            in_function = True
            continue
        if line.startswith("}"):
            in_function = False
            continue
        if not in_function or stripped.startswith("#"):
            continue
        if stripped.startswith("local "):
            for word in stripped[6:].split():
                declared.add(word.split("=", 1)[0])
            continue
        head = stripped.split("=", 1)[0]
        if "=" in stripped and head.isidentifier() and " " not in head:
            assigned.add(head)
    # config_get_bool assigns through its first argument, into a caller's local.
    assert assigned <= declared, f"not local: {sorted(assigned - declared)}"
    assert "config_get_bool enabled" not in text or "local enabled" in text


def test_scripts_are_executable() -> None:
    for script in SCRIPTS:
        assert script.stat().st_mode & 0o111, script.name


def test_init_script_header() -> None:
    text = (FILES / "ebpf-offloader.init").read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert "\nUSE_PROCD=1\n" in text
    start = int(text.split("\nSTART=", 1)[1].split()[0])
    assert start > 20, "must start after network (20) and firewall (19)"


# --------------------------------------------------------------------------
# The init script


def test_start_enabled(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", ENABLED)
    run = sandbox.init("start")
    assert run.returncode == 0, run.stderr
    prog = str(sandbox.bin / "ebpf-offloader")
    assert run.find("config_load") == [["config_load", "ebpf-offloader"]]
    # The check comes before the instance.
    check = run.calls.index(["ebpf_offloader", "config", "-c", "/etc/config/ebpf-offloader"])
    opened = run.calls.index(["procd_open_instance"])
    assert check < opened
    assert run.find("procd_set_param", "command") == [
        ["procd_set_param", "command", prog, "run", "-c", "/etc/config/ebpf-offloader"]
    ]
    (respawn,) = run.find("procd_set_param", "respawn")
    assert len(respawn) == 5 and all(v.isdigit() for v in respawn[2:])
    assert ["procd_set_param", "stdout", "1"] in run.calls
    assert ["procd_set_param", "stderr", "1"] in run.calls
    assert run.names().count("procd_close_instance") == 1
    assert_triggers(run)


def assert_triggers(run: Run) -> None:
    calls = run.calls
    assert ["procd_add_reload_trigger", "ebpf-offloader"] in calls
    (raw,) = [c for c in calls if c[0] == "procd_add_raw_trigger"]
    assert raw[1] == "interface.*"
    assert int(raw[2]) >= 500
    assert raw[3:] == ["/etc/init.d/ebpf-offloader", "reload"]


def test_command_uses_the_installed_program() -> None:
    text = (FILES / "ebpf-offloader.init").read_text()
    assert f"PROG={PROG}\n" in text
    assert 'procd_set_param command "$PROG" run -c "$CONFIG"' in text


def test_start_disabled_starts_nothing(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", DISABLED)
    run = sandbox.init("start")
    assert run.returncode == 0
    assert "procd_open_instance" not in run.names()
    assert "ebpf_offloader" not in run.names()
    # Triggers stay registered, so enabling it later takes effect on reload.
    assert_triggers(run)


def test_start_without_config_file_starts_nothing(sandbox: Sandbox) -> None:
    run = sandbox.init("start")
    assert "procd_open_instance" not in run.names()


@pytest.mark.parametrize("word", ["1", "yes", "on", "true", "enabled"])
def test_enabled_spellings(sandbox: Sandbox, word: str) -> None:
    sandbox.uci("ebpf-offloader", f"config offloader\n\toption enabled '{word}'\n")
    assert "procd_open_instance" in sandbox.init("start").names()


def test_first_offloader_section_decides(sandbox: Sandbox) -> None:
    sandbox.uci(
        "ebpf-offloader",
        "config offloader\n\toption enabled '1'\n\nconfig offloader\n\toption enabled '0'\n",
    )
    assert "procd_open_instance" in sandbox.init("start").names()


def test_start_refuses_bad_config_and_logs(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", ENABLED)
    message = "/etc/config/ebpf-offloader:3: hook: 'tcp' is not one of auto, xdp, xdpgeneric, tc, hybrid"
    sandbox.set_fake("ebpf-offloader", err=message, rc=2)
    run = sandbox.init("start")
    assert run.returncode != 0
    assert "procd_open_instance" not in run.names()
    (log,) = run.find("logger")
    assert log[1:5] == ["-t", "ebpf-offloader", "-p", "daemon.err"]
    assert message in log[5]
    assert message in run.stderr


def test_start_with_bad_config_keeps_a_running_agent(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", ENABLED)
    sandbox.set_fake("ebpf-offloader", err="bad", rc=2)
    run = sandbox.init("start", running=True)
    # Same instance again: procd leaves the running agent alone.
    assert "procd_open_instance" in run.names()
    assert run.find("logger")


def test_reload_running_sends_hup(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", ENABLED)
    run = sandbox.init("reload", running=True)
    assert run.returncode == 0, run.stderr
    assert ["ebpf_offloader", "config", "-c", "/etc/config/ebpf-offloader"] in run.calls
    assert run.find("procd_send_signal") == [["procd_send_signal", "ebpf-offloader", "*", "HUP"]]
    # No new instance and no restart: flows stay offloaded.
    assert "procd_open_instance" not in run.names()
    assert "procd_kill" not in run.names()


def test_reload_with_bad_config_leaves_agent_alone(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", ENABLED)
    sandbox.set_fake("ebpf-offloader", err="x:1: hook: bad", rc=2)
    run = sandbox.init("reload", running=True)
    assert run.returncode != 0
    assert "procd_send_signal" not in run.names()
    assert "procd_open_service" not in run.names()
    assert run.find("logger")


def test_reload_with_unparsable_file_keeps_agent(sandbox: Sandbox) -> None:
    # uci cannot read the file (config_load fails): enabled is unknown, and a
    # running agent must not be stopped because of it.
    sandbox.set_fake("ebpf-offloader", err="x:2: unterminated single quote", rc=2)
    for action in ("reload", "start"):
        run = sandbox.init(action, running=True)
        assert run.returncode != 0
        assert "procd_kill" not in run.names()
        assert "procd_send_signal" not in run.names()
        if "procd_open_service" in run.names():
            assert "procd_open_instance" in run.names()


def test_start_while_running_and_disabled_stops(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", DISABLED)
    run = sandbox.init("start", running=True)
    assert "procd_open_service" in run.names()
    assert "procd_open_instance" not in run.names()


def test_reload_not_running_starts(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", ENABLED)
    run = sandbox.init("reload", running=False)
    assert "procd_send_signal" not in run.names()
    assert "procd_open_instance" in run.names()


def test_reload_after_disabling_stops(sandbox: Sandbox) -> None:
    sandbox.uci("ebpf-offloader", DISABLED)
    run = sandbox.init("reload", running=True)
    # A service message without instances: procd stops the running one.
    assert "procd_open_service" in run.names()
    assert "procd_close_service" in run.names()
    assert "procd_open_instance" not in run.names()
    assert "procd_send_signal" not in run.names()


def test_flush_command(sandbox: Sandbox) -> None:
    run = sandbox.init("flush")
    assert run.returncode == 0
    assert run.find("ebpf_offloader") == [["ebpf_offloader", "flush"]]


def test_check_command(sandbox: Sandbox) -> None:
    run = sandbox.init("check")
    assert run.returncode == 0
    assert run.find("ebpf_offloader") == [
        ["ebpf_offloader", "config", "-c", "/etc/config/ebpf-offloader"]
    ]


def test_stop(sandbox: Sandbox) -> None:
    run = sandbox.init("stop")
    assert run.find("procd_kill")


# --------------------------------------------------------------------------
# Hotplug, fw4 include, uci-defaults, rpcd


def hotplug(sandbox: Sandbox, action: str, device: str) -> list[list[str]]:
    script = sandbox.script("ebpf-offloader.hotplug")
    return sandbox.run([str(script)], env={"ACTION": action, "INTERFACE": device}).calls


def test_hotplug_new_device_signals_agent(sandbox: Sandbox) -> None:
    calls = hotplug(sandbox, "add", "pppoe-wan")
    assert calls == [["ubus", "call", "service", "signal", '{"name":"ebpf-offloader","signal":1}']]


@pytest.mark.parametrize(("action", "device"), [("remove", "eth1"), ("add", "lo"), ("add", "")])
def test_hotplug_ignores_other_events(sandbox: Sandbox, action: str, device: str) -> None:
    assert hotplug(sandbox, action, device) == []


def test_hotplug_never_fails(sandbox: Sandbox) -> None:
    sandbox.set_fake("ubus", err="Command failed: Not found", rc=4)
    script = sandbox.script("ebpf-offloader.hotplug")
    run = sandbox.run([str(script)], env={"ACTION": "add", "INTERFACE": "eth1"})
    assert run.returncode == 0
    assert run.stderr == ""


def fw4_include(sandbox: Sandbox, pinned: bool) -> Run:
    pin_dir = sandbox.root / "bpffs"
    if pinned:
        pin_dir.mkdir()
    # BusyBox runs its own logger applet before PATH: point the script at the fake.
    replace = {
        "/sys/fs/bpf/ebpf-offloader": str(pin_dir),
        "logger -t": f"{sandbox.bin / 'logger'} -t",
    }
    script = sandbox.script("ebpf-offloader.fw4-include", replace)
    return sandbox.run([str(script)])


def test_fw4_include_flushes(sandbox: Sandbox) -> None:
    run = fw4_include(sandbox, pinned=True)
    assert run.returncode == 0
    assert run.calls == [["ebpf_offloader", "flush"]]


def test_fw4_include_skips_without_agent_state(sandbox: Sandbox) -> None:
    run = fw4_include(sandbox, pinned=False)
    assert run.calls == []


def test_fw4_include_no_agent_is_quiet(sandbox: Sandbox) -> None:
    sandbox.set_fake("ebpf-offloader", err="no agent is running", rc=1)
    run = fw4_include(sandbox, pinned=True)
    assert run.returncode == 0
    assert "logger" not in run.names()


def test_fw4_include_failure_is_logged_not_fatal(sandbox: Sandbox) -> None:
    sandbox.set_fake("ebpf-offloader", err="MapError: boom", rc=3)
    run = fw4_include(sandbox, pinned=True)
    assert run.returncode == 0
    (log,) = run.find("logger")
    assert "MapError: boom" in log[-1]


def test_uci_defaults_adds_fw4_include(sandbox: Sandbox) -> None:
    sandbox.env["FAKE_STDIN_uci"] = "1"
    sandbox.set_fake("uci", out="", rc=1)  # `uci get` finds no section yet
    script = sandbox.script("ebpf-offloader.uci-defaults")
    run = sandbox.run([str(script)])
    assert run.returncode == 0
    batch = [c[0].removeprefix("  stdin: ").strip() for c in run.calls if c[0].startswith("  ")]
    assert "set firewall.ebpf_offloader=include" in batch
    assert "set firewall.ebpf_offloader.type='script'" in batch
    assert "set firewall.ebpf_offloader.fw4_compatible='1'" in batch
    assert "commit firewall" in batch
    # The path it registers is where the Makefile installs the include.
    makefile = (FILES.parent / "Makefile").read_text()
    assert "set firewall.ebpf_offloader.path='/usr/share/ebpf-offloader/fw4-include.sh'" in batch
    assert "$(1)/usr/share/ebpf-offloader/fw4-include.sh" in makefile


def test_uci_defaults_is_idempotent(sandbox: Sandbox) -> None:
    sandbox.set_fake("uci", out="include")
    script = sandbox.script("ebpf-offloader.uci-defaults")
    run = sandbox.run([str(script)])
    assert run.returncode == 0
    assert run.calls == [["uci", "-q", "get", "firewall.ebpf_offloader"]]


# OpenWrt's jsonfilter (libubox) has no Debian package: this stand-in answers
# the one query the plugin makes, `jsonfilter -s JSON -e @.KEY`, as jsonfilter
# does (a number or string printed bare, an object as JSON, exit 1 if absent).
JSONFILTER = """#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
doc = json.loads(args[args.index("-s") + 1])
key = args[args.index("-e") + 1].removeprefix("@.")
if not isinstance(doc, dict) or key not in doc:
    sys.exit(1)
v = doc[key]
print(v if isinstance(v, str) else json.dumps(v))
"""


def rpcd(sandbox: Sandbox, *args: str, stdin: str = "{ }") -> Run:
    """Run the plugin as rpcd does: the call's arguments as JSON on stdin."""
    jsonfilter = sandbox.bin / "jsonfilter"
    jsonfilter.write_text(JSONFILTER)
    jsonfilter.chmod(0o755)
    script = sandbox.script("ebpf-offloader.rpcd")
    return sandbox.run([str(script), *args], stdin=stdin)


def test_rpcd_list_declares_the_limit_argument(sandbox: Sandbox) -> None:
    run = rpcd(sandbox, "list")
    # rpcd reads an int32 argument from the number 32 in the signature.
    assert json.loads(run.stdout) == {"status": {"limit": 32}}


@pytest.mark.parametrize(("args", "limit"), [
    ("{ }", "20"), ('{ "limit": 7 }', "7"), ('{"limit": 500}', "500"), ('{"limit": 1}', "1"),
])  # fmt: skip
def test_rpcd_status_asks_for_a_bounded_answer(sandbox: Sandbox, args: str, limit: str) -> None:
    status = {"running": True, "interfaces": [{"name": "eth0", "hook": "tc"}], "flows": [],
              "counts": {"offloaded": 0, "passed": 0, "pending": 0, "total": 0}}
    sandbox.set_fake("ebpf-offloader", out=json.dumps(status))
    run = rpcd(sandbox, "call", "status", stdin=args)
    assert run.returncode == 0
    assert json.loads(run.stdout) == status
    assert run.calls == [["ebpf_offloader", "status", "--json", "--limit", limit]]


@pytest.mark.parametrize("args", [
    '{"limit": 0}', '{"limit": 501}', '{"limit": -1}', '{"limit": 2.5}', '{"limit": "ten"}',
    '{"limit": 1e3}', '{"limit": "5; reboot"}', '{"limit": "0010"}', '{"limit": 100000}',
    '{"limit": [1]}', '{"limit": {"n": 1}}',
])  # fmt: skip
def test_rpcd_status_refuses_a_bad_limit(sandbox: Sandbox, args: str) -> None:
    run = rpcd(sandbox, "call", "status", stdin=args)
    assert run.returncode == 0
    assert json.loads(run.stdout) == {"error": "limit must be an integer from 1 to 500"}
    assert run.calls == []  # the agent is not asked


def test_rpcd_call_status_without_agent(sandbox: Sandbox) -> None:
    sandbox.set_fake("ebpf-offloader", err="no ebpf-offloader agent is running.", rc=1)
    run = rpcd(sandbox, "call", "status")
    answer = json.loads(run.stdout)
    assert answer["running"] is False
    assert answer["flows"] == [] and answer["interfaces"] == []
    assert answer["error"] == "no ebpf-offloader agent is running."


def test_rpcd_status_says_why_the_agent_did_not_answer(sandbox: Sandbox) -> None:
    why = 'ControlAddressHeld: the control address is held by uid 65534 (pid 9), "not" a root\\agent'
    sandbox.set_fake("ebpf-offloader", err=why, rc=1)
    answer = json.loads(rpcd(sandbox, "call", "status").stdout)
    assert answer["running"] is False
    assert answer["error"] == why


def test_rpcd_unknown_method(sandbox: Sandbox) -> None:
    run = rpcd(sandbox, "call", "reboot")
    assert run.returncode != 0
    assert run.stdout == ""


def test_rpcd_acl_grants_status() -> None:
    acl = json.loads((FILES / "ebpf-offloader.acl.json").read_text())
    (entry,) = acl.values()
    assert entry["read"]["ubus"] == {"ebpf-offloader": ["status"]}


def test_ppp_hooks_record_and_forget_the_peer(tmp_path: Path) -> None:
    """The ip-up hook writes the peer MAC pppd exports under the ppp device's
    name; ip-down removes it (run with dash, as pppd would run it)."""
    env = {"PATH": "/usr/bin:/bin", "EBPF_OFFLOADER_RUN_DIR": str(tmp_path / "ppp"),
           "MACREMOTE": "cc:00:00:00:00:01"}
    up, down = FILES / "ebpf-offloader.ppp-up", FILES / "ebpf-offloader.ppp-down"
    subprocess.run(["sh", str(up), "pppoe-wan", "eth1", "0"], env=env, check=True)
    assert (tmp_path / "ppp" / "pppoe-wan").read_text() == "cc:00:00:00:00:01\n"
    subprocess.run(["sh", str(down), "pppoe-wan"], env=env, check=True)
    assert not (tmp_path / "ppp" / "pppoe-wan").exists()
