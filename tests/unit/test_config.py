"""The uci reader and Settings: real-format files, and every error they report."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from pathlib import Path

import pytest

from offloader import config
from offloader.config import (
    DEFAULT_CONFIG_PATH,
    Settings,
    format_settings,
    load_settings,
    network_devices,
    parse_uci,
    zone_networks,
)
from offloader.errors import ConfigError, OffloadError

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "openwrt" / "files" / "ebpf-offloader.config"


def write(tmp_path: Path, text: str, name: str = "ebpf-offloader") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value


# --------------------------------------------------------------------------
# parse_uci: the syntax


def test_parse_real_format_file() -> None:
    text = """\
# comment at the top
package 'network'

config interface 'loopback'
\toption device 'lo'
\toption proto 'static'
\toption ipaddr '127.0.0.1'

config device
\toption name 'br-lan'
\toption type 'bridge'
\tlist ports 'lan1'
\tlist ports "lan2"   # trailing comment
\tlist ports lan3

config interface lan
\toption device br-lan
"""
    sections = parse_uci(text, "network")
    assert [(s.type, s.name, s.line) for s in sections] == [
        ("interface", "loopback", 4),
        ("device", None, 9),
        ("interface", "lan", 16),
    ]
    assert sections[0].get("ipaddr") == "127.0.0.1"
    assert sections[1].values("ports") == ["lan1", "lan2", "lan3"]
    assert sections[1].entries[2].line == 12
    assert sections[2].get("device") == "br-lan"
    assert sections[2].get("missing") is None
    assert sections[2].get("missing", "x") == "x"


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("option v 'a b'", "a b"),
        ('option v "a b"', "a b"),
        ("option v 'it'\\''s'", "it's"),
        ('option v "say \\"hi\\""', 'say "hi"'),
        ('option v "back\\\\slash"', "back\\slash"),
        ("option v a\\ b", "a b"),
        ("option v 'a'\"b\"c", "abc"),
        ("option v '#not a comment'", "#not a comment"),
        ("option v ''", ""),
        ("option v 'single \\ backslash'", "single \\ backslash"),
        ("option v x#y", "x#y"),
        ("\t  option   v   spaced  ", "spaced"),
    ],
)
def test_quoting_and_escapes(line: str, value: str) -> None:
    (section,) = parse_uci(f"config t\n{line}\n", "f")
    assert section.entries[0].value == value


def test_last_option_wins_and_option_values_split() -> None:
    (section,) = parse_uci("config t\noption a 1\noption a 2\noption l 'x y'\n", "f")
    assert section.get("a") == "2"
    assert section.values("l") == ["x", "y"]


def test_empty_and_comment_only_text() -> None:
    assert parse_uci("", "f") == []
    assert parse_uci("\n   \n# only\n\t# comments\n", "f") == []


def test_crlf_line_endings() -> None:
    (section,) = parse_uci("config t 'n'\r\n\toption a 'b'\r\n", "f")
    assert section.name == "n"
    assert section.get("a") == "b"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("option a b\n", 1, "before the first 'config'"),
        ("config\n", 1, "takes a section type"),
        ("config a b c\n", 1, "takes a section type"),
        ("config 'bad-type'\n", 1, "invalid section type"),
        ("config t 'bad name'\n", 1, "invalid section name"),
        ("config t\n\toption\n", 2, "without a name"),
        ("config t\n\toption a\n", 2, "without a value"),
        ("config t\n\tlist a\n", 2, "without a value"),
        ("config t\n\toption a b c\n", 2, "values where one is expected"),
        ("config t\n\toption 'a-b' c\n", 2, "invalid option name"),
        ("config t\n\toption a 'open\n", 2, "unterminated single quote"),
        ('config t\n\toption a "open\n', 2, "unterminated double quote"),
        ('config t\n\toption a "open\\\n', 2, "unterminated double quote"),
        ("config t\n\toption a b\\\n", 2, "backslash at the end"),
        ("config t\n\n\tvalue a b\n", 3, "unknown keyword"),
        ("config t ; option a b\n", 1, "statement separators"),
        ("package\n", 1, "'package' takes"),
    ],
)
def test_syntax_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_uci(text, "/etc/config/x")
    err = info.value
    assert err.file == "/etc/config/x"
    assert err.line == line
    assert message in err.reason
    assert str(err).startswith(f"/etc/config/x:{line}: ")


# --------------------------------------------------------------------------
# Settings


def test_defaults_match_the_documented_api() -> None:
    s = Settings()
    assert s.enabled is False
    assert s.hook == "auto"
    assert s.interfaces == ()
    assert (s.max_flows, s.pending_flows) == (65536, 8192)
    assert s.event_ring_kib == 512
    assert s.sweep_interval == 1.0
    assert (s.tcp_timeout, s.udp_timeout) == (300, 60)
    assert s.offload_udp == "yes"
    assert s.exclude_src == s.exclude_dst == ()
    assert s.exclude_zones == ()
    assert s.log_level == "info"
    assert s.heartbeat_timeout == 3.0
    assert s.object == ""


def test_settings_are_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        Settings(True)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().hook = "tc"  # type: ignore[misc]


def test_replace_revalidates_like_a_cli_override() -> None:
    s = dataclasses.replace(Settings(), hook="tc", interfaces=("eth0", "br-lan"))
    assert s.hook == "tc"
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(s, hook="xdpdrv")
    assert info.value.option == "hook"
    assert str(info.value) == "hook: 'xdpdrv' is not one of auto, xdp, xdpgeneric, tc, hybrid"


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"enabled": 1}, "enabled"),
        ({"hook": "XDP"}, "hook"),
        ({"interfaces": ["eth0"]}, "interfaces"),
        ({"interfaces": ("a" * 16,)}, "interfaces"),
        ({"interfaces": ("eth0/1",)}, "interfaces"),
        ({"interfaces": ("",)}, "interfaces"),
        ({"interfaces": ("eth0", "eth0")}, "interfaces"),
        ({"max_flows": 1023}, "max_flows"),
        ({"max_flows": 4194305}, "max_flows"),
        ({"max_flows": 65536.0}, "max_flows"),
        ({"max_flows": True}, "max_flows"),
        ({"pending_flows": 255}, "pending_flows"),
        ({"pending_flows": 1048577}, "pending_flows"),
        ({"event_ring_kib": 32}, "event_ring_kib"),
        ({"event_ring_kib": 131072}, "event_ring_kib"),
        ({"event_ring_kib": 1000}, "event_ring_kib"),
        ({"sweep_interval": 0.05}, "sweep_interval"),
        ({"sweep_interval": 61}, "sweep_interval"),
        ({"sweep_interval": float("nan")}, "sweep_interval"),
        ({"sweep_interval": "1"}, "sweep_interval"),
        ({"tcp_timeout": 0}, "tcp_timeout"),
        ({"tcp_timeout": 86401}, "tcp_timeout"),
        ({"udp_timeout": 0}, "udp_timeout"),
        ({"offload_udp": "maybe"}, "offload_udp"),
        ({"exclude_src": ("10.0.0.0/8",)}, "exclude_src"),
        ({"exclude_dst": [ipaddress.ip_network("10.0.0.0/8")]}, "exclude_dst"),
        ({"exclude_zones": ("bad zone",)}, "exclude_zone"),
        ({"log_level": "trace"}, "log_level"),
        ({"heartbeat_timeout": 0.4}, "heartbeat_timeout"),
        ({"heartbeat_timeout": 60.5}, "heartbeat_timeout"),
        ({"object": "a\0b"}, "object"),
    ],
)
def test_invalid_values_name_the_option(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**kwargs)  # type: ignore[arg-type]
    assert info.value.option == option
    assert info.value.file == ""


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_flows": 1024},
        {"max_flows": 4194304},
        {"pending_flows": 256},
        {"pending_flows": 1048576},
        {"event_ring_kib": 64},
        {"event_ring_kib": 65536},
        {"sweep_interval": 0.1},
        {"sweep_interval": 60},
        {"tcp_timeout": 1, "udp_timeout": 86400},
        {"heartbeat_timeout": 0.5},
        {"heartbeat_timeout": 60},
        {"hook": "xdpgeneric", "offload_udp": "assured", "log_level": "debug"},
    ],
)
def test_boundaries_are_accepted(kwargs: dict[str, object]) -> None:
    Settings(**kwargs)  # type: ignore[arg-type]


def test_int_seconds_become_float() -> None:
    s = Settings(sweep_interval=2, heartbeat_timeout=5)
    assert isinstance(s.sweep_interval, float)
    assert isinstance(s.heartbeat_timeout, float)


def test_range_message_reads_naturally() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(max_flows=12)
    assert str(info.value) == "max_flows: 12 is out of range: must be 1024 to 4194304"


# --------------------------------------------------------------------------
# load_settings


FULL = """\
# /etc/config/ebpf-offloader
config offloader 'main'
\toption enabled '1'
\toption hook 'tc'
\tlist interfaces 'br-lan'
\tlist interfaces 'wan'
\toption max_flows '131072'
\toption pending_flows '4096'
\toption sweep_interval '0.5'
\toption tcp_timeout '600'
\toption udp_timeout '30'
\toption offload_udp 'assured'
\tlist exclude_src '192.168.1.10'
\tlist exclude_src '10.0.0.1/8'
\toption exclude_dst 'fd00::/8 203.0.113.0/24'
\tlist exclude_zone 'guest'
\toption log_level 'debug'
\toption heartbeat_timeout '5'
\toption object '/tmp/offload.bpf.o'
"""


def test_load_every_option(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL))
    assert s == Settings(
        enabled=True,
        hook="tc",
        interfaces=("br-lan", "wan"),
        max_flows=131072,
        pending_flows=4096,
        sweep_interval=0.5,
        tcp_timeout=600,
        udp_timeout=30,
        offload_udp="assured",
        exclude_src=(
            ipaddress.ip_network("192.168.1.10/32"),
            ipaddress.ip_network("10.0.0.0/8"),
        ),
        exclude_dst=(
            ipaddress.ip_network("fd00::/8"),
            ipaddress.ip_network("203.0.113.0/24"),
        ),
        exclude_zones=("guest",),
        log_level="debug",
        heartbeat_timeout=5.0,
        object="/tmp/offload.bpf.o",
    )


def test_to_dict_is_json_keyed_by_uci_names(tmp_path: Path) -> None:
    d = load_settings(write(tmp_path, FULL)).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {
        "enabled", "hook", "interfaces", "max_flows", "pending_flows", "event_ring_kib",
        "sweep_interval",
        "tcp_timeout", "udp_timeout", "offload_udp", "exclude_src", "exclude_dst",
        "exclude_zone", "log_level", "heartbeat_timeout", "object", "early_drop",
        "early_drop_packets", "early_drop_after_ms", "early_drop_time", "early_drop_entries",
        "control_group",
    }  # fmt: skip
    assert d["enabled"] is True
    assert d["interfaces"] == ["br-lan", "wan"]
    assert d["exclude_src"] == ["192.168.1.10/32", "10.0.0.0/8"]
    assert d["exclude_zone"] == ["guest"]
    assert d["heartbeat_timeout"] == 5.0


def test_to_dict_of_defaults() -> None:
    d = Settings().to_dict()
    assert d["enabled"] is False
    assert d["interfaces"] == [] and d["exclude_dst"] == []
    assert d["max_flows"] == 65536


def test_format_settings_one_option_per_line(tmp_path: Path) -> None:
    text = format_settings(load_settings(write(tmp_path, FULL)))
    lines = text.splitlines()
    assert text.endswith("\n")
    assert len(lines) == len(config.OPTIONS)
    pairs = dict(line.split(None, 1) for line in lines)
    assert pairs["enabled"] == "1"
    assert pairs["hook"] == "tc"
    assert pairs["interfaces"] == "br-lan wan"
    assert pairs["exclude_dst"] == "fd00::/8 203.0.113.0/24"
    assert pairs["exclude_zone"] == "guest"


def test_format_settings_explains_empty_values() -> None:
    pairs = dict(line.split(None, 1) for line in format_settings(Settings()).splitlines())
    assert pairs["enabled"] == "0"
    assert "lan and wan" in pairs["interfaces"]
    assert pairs["exclude_src"] == "(none)"
    assert "default" in pairs["object"]


@pytest.mark.parametrize("word", ["1", "yes", "on", "true", "enabled", "YES"])
def test_true_spellings(tmp_path: Path, word: str) -> None:
    assert load_settings(write(tmp_path, f"config offloader\n\toption enabled '{word}'\n")).enabled


@pytest.mark.parametrize("word", ["0", "no", "off", "false", "disabled"])
def test_false_spellings(tmp_path: Path, word: str) -> None:
    text = f"config offloader\n\toption enabled '{word}'\n"
    assert not load_settings(write(tmp_path, text)).enabled


def test_anonymous_section_is_read(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "config offloader\n\toption hook xdp\n"))
    assert s.hook == "xdp"


def test_file_without_a_section_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing here\n")) == Settings()


def test_option_with_blank_separated_list(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "config offloader\n\toption interfaces 'eth0 eth1'\n"))
    assert s.interfaces == ("eth0", "eth1")


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        load_settings(missing)
    assert info.value.file == missing
    assert "no such file" in str(info.value)


def test_unreadable_bytes_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bin"
    path.write_bytes(b"config offloader\n\toption hook '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(str(path))


def test_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_CONFIG_PATH == "/etc/config/ebpf-offloader"
    missing = str(tmp_path / "absent")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", missing)
    assert load_settings() == Settings()
    present = write(tmp_path, "config offloader 'main'\n\toption hook 'tc'\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", present)
    assert load_settings().hook == "tc"
    assert load_settings(None).hook == "tc"


def test_config_error_is_an_offload_error(tmp_path: Path) -> None:
    err = error_of(tmp_path, "config offloader\n\toption hook bogus\n")
    assert isinstance(err, OffloadError)


@pytest.mark.parametrize(
    ("body", "line", "option", "message"),
    [
        ("\toption enabled 'maybe'\n", 2, "enabled", "not a boolean"),
        ("\toption hook 'xdpdrv'\n", 2, "hook", "not one of"),
        ("\toption max_flows 'lots'\n", 2, "max_flows", "not an integer"),
        ("\toption max_flows '1e6'\n", 2, "max_flows", "not an integer"),
        ("\toption max_flows '100'\n", 2, "max_flows", "out of range"),
        ("\toption pending_flows '99999999'\n", 2, "pending_flows", "out of range"),
        ("\toption sweep_interval 'fast'\n", 2, "sweep_interval", "not a number"),
        ("\toption sweep_interval 'inf'\n", 2, "sweep_interval", "not a number"),
        ("\toption sweep_interval '0'\n", 2, "sweep_interval", "out of range"),
        ("\toption tcp_timeout '-5'\n", 2, "tcp_timeout", "out of range"),
        ("\toption udp_timeout '1.5'\n", 2, "udp_timeout", "not an integer"),
        ("\toption offload_udp 'sometimes'\n", 2, "offload_udp", "not one of"),
        ("\tlist exclude_src '10.0.0.300'\n", 2, "exclude_src", "not an IPv4 or IPv6"),
        ("\toption exclude_dst '10.0.0.0/8 nonsense'\n", 2, "exclude_dst", "'nonsense'"),
        ("\tlist exclude_zone 'two words'\n", 2, "exclude_zone", "not a valid zone name"),
        ("\toption log_level 'verbose'\n", 2, "log_level", "not one of"),
        ("\toption heartbeat_timeout '0.1'\n", 2, "heartbeat_timeout", "out of range"),
        ("\tlist interfaces 'way-too-long-name'\n", 2, "interfaces", "not a valid interface"),
        ("\tlist interfaces ''\n", 2, "interfaces", "empty list value"),
        ("\toption hook tc\n\toption max_flow '1'\n", 3, "max_flow", "unknown option"),
        ("\toption hook tc\n\toption hook xdp\n", 3, "hook", "given again (first on line 3)"),
        ("\tlist hook tc\n", 2, "hook", "use 'option', not 'list'"),
        ("\tlist interfaces a\n\tlist interfaces a\n", 2, "interfaces", "given twice"),
        (
            "\toption interfaces 'a b'\n\tlist interfaces c\n",
            3,
            "interfaces",
            "either one 'option'",
        ),
        (
            "\tlist interfaces c\n\toption interfaces 'a b'\n",
            3,
            "interfaces",
            "either one 'option'",
        ),
    ],
)
def test_bad_values_name_file_line_and_option(
    tmp_path: Path, body: str, line: int, option: str, message: str
) -> None:
    text = "# comment\nconfig offloader 'main'\n" + body
    err = error_of(tmp_path, text)
    path = str(tmp_path / "ebpf-offloader")
    assert (err.file, err.line, err.option) == (path, line + 1, option)
    assert message in err.reason
    assert str(err) == f"{path}:{line + 1}: {option}: {err.reason}"


def test_unknown_section_type_is_an_error(tmp_path: Path) -> None:
    err = error_of(tmp_path, "config offloader\n\nconfig offload 'typo'\n")
    assert err.line == 3
    assert "unknown section type 'offload'" in err.reason


def test_second_main_section_is_an_error(tmp_path: Path) -> None:
    err = error_of(tmp_path, "config offloader 'main'\nconfig offloader\n")
    assert err.line == 2
    assert "second" in err.reason


def test_syntax_error_through_load_settings(tmp_path: Path) -> None:
    err = error_of(tmp_path, "config offloader\n\toption hook 'tc\n")
    assert err.line == 2
    assert "unterminated" in err.reason


def test_shipped_defaults_file_is_valid() -> None:
    if not SHIPPED_CONFIG.exists():
        pytest.skip("openwrt/files/ebpf-offloader.config not written yet")
    s = load_settings(str(SHIPPED_CONFIG))
    # Shipped disabled: installing the package must not change forwarding.
    assert s.enabled is False
    assert s == dataclasses.replace(Settings(), enabled=False)


def test_shipped_defaults_file_documents_every_option() -> None:
    if not SHIPPED_CONFIG.exists():
        pytest.skip("openwrt/files/ebpf-offloader.config not written yet")
    text = SHIPPED_CONFIG.read_text()
    for name in Settings().to_dict():
        assert name in text, name


def test_settings_field_option() -> None:
    assert config.settings_field_option("exclude_zones") == "exclude_zone"
    assert config.settings_field_option("hook") == "hook"
    with pytest.raises(KeyError):
        config.settings_field_option("nope")


# --------------------------------------------------------------------------
# /etc/config/network and /etc/config/firewall

NETWORK = """\
config interface 'loopback'
\toption device 'lo'
\toption proto 'static'

config globals 'globals'
\toption ula_prefix 'fd12:3456:789a::/48'

config device
\toption name 'br-lan'
\toption type 'bridge'
\tlist ports 'lan1'
\tlist ports 'lan2'

config interface 'lan'
\toption device 'br-lan'
\toption proto 'static'

config interface 'wan'
\toption device 'wan'
\toption proto 'pppoe'

config interface 'wan6'
\toption device '@wan'
\toption proto 'dhcpv6'
"""


def test_network_devices_default_interfaces(tmp_path: Path) -> None:
    path = write(tmp_path, NETWORK, "network")
    assert network_devices(path) == ("br-lan", "wan")


def test_network_devices_alias_and_order(tmp_path: Path) -> None:
    path = write(tmp_path, NETWORK, "network")
    assert network_devices(path, ("wan6", "lan", "wan")) == ("wan", "br-lan")
    assert network_devices(path, ("guest",)) == ()


def test_network_devices_legacy_ifname(tmp_path: Path) -> None:
    text = """\
config interface 'lan'
\toption type 'bridge'
\toption ifname 'eth0.1 eth0.3'

config interface 'wan'
\toption ifname 'eth0.2'

config interface 'loop'
\toption device '@loop'
"""
    path = write(tmp_path, text, "network")
    assert network_devices(path) == ("br-lan", "eth0.2")
    assert network_devices(path, ("loop",)) == ()


def test_network_devices_missing_file(tmp_path: Path) -> None:
    assert network_devices(str(tmp_path / "network")) == ()


def test_network_devices_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "config interface 'lan'\n\toption device 'br-lan\n", "network")
    with pytest.raises(ConfigError) as info:
        network_devices(path)
    assert (info.value.file, info.value.line) == (path, 2)


FIREWALL = """\
config defaults
\toption flow_offloading '0'

config zone
\toption name 'lan'
\tlist network 'lan'

config zone
\toption name 'wan'
\tlist network 'wan'
\tlist network 'wan6'

config zone
\toption name 'guest'
\toption network 'guest iot'

config forwarding
\toption src 'lan'
\toption dest 'wan'
"""


def test_zone_networks(tmp_path: Path) -> None:
    path = write(tmp_path, FIREWALL, "firewall")
    assert zone_networks(path, ("wan",)) == ("wan", "wan6")
    assert zone_networks(path, ("guest", "lan")) == ("guest", "iot", "lan")
    assert zone_networks(path, ()) == ()


def test_zone_networks_nothing_asked_reads_nothing(tmp_path: Path) -> None:
    assert zone_networks(str(tmp_path / "absent"), ()) == ()


def test_zone_networks_unknown_zone(tmp_path: Path) -> None:
    path = write(tmp_path, FIREWALL, "firewall")
    with pytest.raises(ConfigError) as info:
        zone_networks(path, ("dmz",))
    assert info.value.option == "exclude_zone"
    assert "'dmz' is not defined" in str(info.value)


def test_zone_networks_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        zone_networks(str(tmp_path / "firewall"), ("lan",))


def options_table() -> dict[str, list[str]]:
    """The rows of docs/configuration.md's Options table, by option name."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    table = doc.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_option_is_documented() -> None:
    rows = options_table()
    assert set(rows) == {o.name for o in config.OPTIONS}, "docs table and schema differ"
    for option in config.OPTIONS:
        text = option.default_text
        documented = f"`{text}`" if text else "none" if option.many else "empty"
        assert rows[option.name][1] == documented, rows[option.name]


def test_docs_name_the_options_that_redecide_every_flow() -> None:
    doc = " ".join((REPO / "docs" / "configuration.md").read_text().split())
    found = re.search(r"A change to (.*?) changes what may be offloaded", doc)
    assert found is not None
    named = set(re.findall(r"`(\w+)`", found.group(1)))
    assert named == {o.name for o in config.OPTIONS if o.redecides}


# --------------------------------------------------------------------------
# The option schema and what follows from it


NET = ipaddress.ip_network("198.18.0.0/15")
# A valid value other than the default, for every Settings field.
CHANGED: dict[str, object] = {
    "enabled": True, "hook": "tc", "interfaces": ("eth0",), "max_flows": 2048,
    "pending_flows": 512, "event_ring_kib": 256, "sweep_interval": 2.0, "tcp_timeout": 10, "udp_timeout": 10,
    "offload_udp": "assured", "exclude_src": (NET,), "exclude_dst": (NET,),
    "exclude_zones": ("guest",), "log_level": "debug", "heartbeat_timeout": 5.0,
    "object": "/x.o", "early_drop": False, "early_drop_packets": 32,
    "early_drop_after_ms": 500, "early_drop_time": 60, "early_drop_entries": 8192,
    "control_group": "network",
}  # fmt: skip
# What may be offloaded depends on these; the agent decides every flow again.
REDECIDING = {"offload_udp", "exclude_src", "exclude_dst", "exclude_zones"}


def test_schema_describes_every_field_once() -> None:
    assert [o.field for o in config.OPTIONS] == [f.name for f in dataclasses.fields(Settings)]
    assert list(Settings().to_dict()) == [o.name for o in config.OPTIONS]
    assert set(CHANGED) == {o.field for o in config.OPTIONS}
    for option in config.OPTIONS:
        assert getattr(Settings(), option.field) == option.default
        assert option.doc and "\n" not in option.doc
        assert config.settings_field_option(option.field) == option.name


@pytest.mark.parametrize("name", CHANGED)
def test_redecide_needed_only_for_what_may_be_offloaded(name: str) -> None:
    old = Settings()
    new = dataclasses.replace(old, **{name: CHANGED[name]})  # type: ignore[arg-type]
    assert new != old
    assert config.redecide_needed(old, new) is (name in REDECIDING)
    assert config.redecide_needed(new, old) is (name in REDECIDING)
    assert config.redecide_needed(new, dataclasses.replace(new)) is False


def test_overrides_convert_and_check_like_the_file() -> None:
    base = Settings(interfaces=("br-lan",), exclude_src=(NET,))
    s = config.apply_overrides(base, [
        "max_flows=131072", "enabled=yes", "interfaces=eth0 eth1", "interfaces=wan",
        "exclude_src=", "exclude_zone=guest",
    ])  # fmt: skip
    assert s == dataclasses.replace(
        base, max_flows=131072, enabled=True, interfaces=("eth0", "eth1", "wan"),
        exclude_src=(), exclude_zones=("guest",),
    )  # fmt: skip
    assert config.apply_overrides(base, []) == base


@pytest.mark.parametrize(
    ("pair", "option", "message"),
    [
        ("max_flows", "max_flows", "command line: max_flows: expected OPTION=VALUE"),
        ("max_flow=1", "max_flow", "command line: max_flow: unknown option"),
        ("exclude_zones=guest", "exclude_zones", "command line: exclude_zones: unknown option"),
        ("hook=warp", "hook", "command line: hook: 'warp' is not one of auto, xdp, xdpgeneric, tc, hybrid"),
        ("tcp_timeout=x", "tcp_timeout", "command line: tcp_timeout: 'x' is not an integer"),
        ("interfaces=a a", "interfaces", "command line: interfaces: 'a' is given twice"),
    ],
)
def test_bad_override_names_the_option(pair: str, option: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.apply_overrides(Settings(), [pair])
    assert (info.value.file, info.value.option, str(info.value)) == ("command line", option, message)


def test_describe_options_shows_each_option_with_its_default() -> None:
    lines = config.describe_options().splitlines()
    assert len(lines) == len(config.OPTIONS)
    for line, option in zip(lines, config.OPTIONS, strict=True):
        assert line.split()[0] == f"{option.name}={option.default_text}"
        assert line.endswith(option.doc)


@pytest.mark.parametrize("value", ["network", "_rpc", "ebpf-offloader", ""])
def test_control_group_takes_group_names(value: str) -> None:
    assert config.apply_overrides(Settings(), [f"control_group={value}"]).control_group == value


@pytest.mark.parametrize("value", ["1abc", "a b", "a:b", "x" * 33])
def test_control_group_refuses_what_is_not_a_group_name(value: str) -> None:
    with pytest.raises(ConfigError, match="control_group: .* is not a group name"):
        Settings(control_group=value)
