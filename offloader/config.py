"""The agent's settings and the uci reader they come from.

OpenWrt keeps configuration in /etc/config/<package> files in uci syntax.
The agent parses them itself (no libuci binding) so that the same code runs on
a router, on a Debian lab box and in the unit tests.

    parse_uci()        text -> [UciSection]: the generic uci syntax
    load_settings()    /etc/config/ebpf-offloader -> Settings, every value checked
    Settings           frozen, keyword-only; validates on construction, so a
                       CLI override `dataclasses.replace(s, hook="tc")` is
                       checked too
    network_devices()  the devices of /etc/config/network's lan and wan
    zone_networks()    the networks of fw4 zones named in exclude_zone

Every problem is a ConfigError that names the file, the line and the option,
and nothing is half-applied: load_settings() returns a whole Settings or raises.
"""

from __future__ import annotations

import builtins
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from offloader.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/config/ebpf-offloader"
DEFAULT_NETWORK_PATH = "/etc/config/network"
DEFAULT_FIREWALL_PATH = "/etc/config/firewall"

# The uci section type that holds the agent's settings.
SECTION_TYPE = "offloader"

HOOKS = ("auto", "xdp", "xdpgeneric", "tc")
OFFLOAD_UDP_MODES = ("yes", "assured", "no")
LOG_LEVELS = ("debug", "info", "warning", "error")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# uci's boolean spellings (the same set libuci's config_get_bool accepts).
_TRUE = frozenset({"1", "yes", "on", "true", "enabled"})
_FALSE = frozenset({"0", "no", "off", "false", "disabled"})

# Names of sections, options and section types: what libuci accepts.
_NAME_RE = re.compile(r"[A-Za-z0-9_]+\Z")
# Linux interface names: at most IFNAMSIZ-1 bytes, no '/', ':' or whitespace.
_IFNAME_RE = re.compile(r"[^/:\s]{1,15}\Z")
# fw4 zone names (fw4 allows at most 11 characters; be a little lenient).
_ZONE_RE = re.compile(r"[A-Za-z0-9_.+-]{1,32}\Z")


# --------------------------------------------------------------------------
# The generic uci parser


@dataclass(frozen=True)
class UciEntry:
    """One `option` or `list` line of a section."""

    kind: Literal["option", "list"]
    name: str
    value: str
    line: int


@dataclass
class UciSection:
    """One `config TYPE ['NAME']` block; `name` is None for anonymous sections."""

    type: str
    name: str | None
    line: int
    entries: list[UciEntry] = field(default_factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of option `name` as uci would report it (the last one wins)."""
        for entry in reversed(self.entries):
            if entry.name == name:
                return entry.value
        return default

    def values(self, name: str) -> list[str]:
        """Every value of `name`: each `list` line, and `option` values split on blanks."""
        result: list[str] = []
        for entry in self.entries:
            if entry.name != name:
                continue
            if entry.kind == "list":
                result.append(entry.value)
            else:
                result.extend(entry.value.split())
        return result


class _Tokenizer:
    """Splits one uci line into words, the way libuci's parser does.

    Words are separated by blanks; single quotes take everything literally,
    double quotes and bare words honour backslash escapes; quoted and bare parts
    that touch form one word (`a'b c'` is `ab c`); `#` where a word would start
    begins a comment.
    """

    def __init__(self, text: str, file: str, line: int) -> None:
        self.text = text
        self.file = file
        self.line = line

    def _error(self, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line)

    def words(self) -> list[str]:
        text = self.text
        words: list[str] = []
        i, n = 0, len(text)
        while True:
            while i < n and text[i] in " \t\r\f\v":
                i += 1
            if i >= n or text[i] == "#":
                return words
            if text[i] == ";":
                raise self._error("';' statement separators are not supported, use one per line")
            word: list[str] = []
            while i < n and text[i] not in " \t\r\f\v":
                ch = text[i]
                if ch == "'":
                    end = text.find("'", i + 1)
                    if end < 0:
                        raise self._error("unterminated single quote")
                    word.append(text[i + 1 : end])
                    i = end + 1
                elif ch == '"':
                    i += 1
                    while True:
                        if i >= n:
                            raise self._error("unterminated double quote")
                        ch = text[i]
                        if ch == '"':
                            i += 1
                            break
                        if ch == "\\":
                            if i + 1 >= n:
                                raise self._error("unterminated double quote")
                            word.append(text[i + 1])
                            i += 2
                        else:
                            word.append(ch)
                            i += 1
                elif ch == "\\":
                    if i + 1 >= n:
                        raise self._error("backslash at the end of the line")
                    word.append(text[i + 1])
                    i += 2
                else:
                    word.append(ch)
                    i += 1
            words.append("".join(word))


def parse_uci(text: str, file: str) -> list[UciSection]:
    """Parse uci text into its sections, in file order.

    Understands `package`, `config TYPE [NAME]`, `option NAME VALUE` and
    `list NAME VALUE`, quoting, escapes, comments and blank lines. A syntax error
    is a ConfigError carrying `file` and the 1-based line number.
    """
    sections: list[UciSection] = []
    current: UciSection | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        words = _Tokenizer(raw, file, lineno).words()
        if not words:
            continue
        keyword, args = words[0], words[1:]

        def fail(message: str, option: str = "", line: int = lineno) -> ConfigError:
            return ConfigError(message, file=file, line=line, option=option)

        if keyword == "package":
            if len(args) != 1:
                raise fail("'package' takes exactly one name")
            continue
        if keyword == "config":
            if not args or len(args) > 2:
                raise fail("'config' takes a section type and an optional name")
            if not _NAME_RE.match(args[0]):
                raise fail(f"invalid section type {args[0]!r}")
            name = args[1] if len(args) == 2 else None
            if name is not None and not _NAME_RE.match(name):
                raise fail(f"invalid section name {name!r} (letters, digits and '_' only)")
            current = UciSection(type=args[0], name=name, line=lineno)
            sections.append(current)
            continue
        if keyword in ("option", "list"):
            if current is None:
                raise fail(f"'{keyword}' before the first 'config' line")
            if not args:
                raise fail(f"'{keyword}' without a name")
            name = args[0]
            if not _NAME_RE.match(name):
                raise fail(f"invalid option name {name!r} (letters, digits and '_' only)")
            if len(args) == 1:
                raise fail(f"'{keyword}' without a value", option=name)
            if len(args) > 2:
                raise fail(
                    f"{len(args) - 1} values where one is expected (quote values with blanks)",
                    option=name,
                )
            kind: Literal["option", "list"] = "option" if keyword == "option" else "list"
            current.entries.append(UciEntry(kind=kind, name=name, value=args[1], line=lineno))
            continue
        raise fail(f"unknown keyword {keyword!r} (expected config, option or list)")
    return sections


def read_uci(path: str) -> list[UciSection]:
    """Read and parse a uci file; an unreadable file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as exc:
        raise ConfigError("no such file", file=path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason})", file=path) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=path) from exc
    return parse_uci(text, path)


# --------------------------------------------------------------------------
# Settings


def _num(value: float) -> str:
    """A number as a person writes it: 4194304, 0.5."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _check_range(option: str, value: object, lo: float, hi: float, kind: type) -> None:
    what = "an integer" if kind is int else "a number"
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, accepted) or not math.isfinite(value):
        raise ConfigError(
            f"must be {what} from {_num(lo)} to {_num(hi)}, not {value!r}", option=option
        )
    if not lo <= value <= hi:
        raise ConfigError(
            f"{_num(value)} is out of range: must be {_num(lo)} to {_num(hi)}", option=option
        )


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(choices)}", option=option)


def _check_names(option: str, value: object, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, tuple):
        raise ConfigError(f"must be a tuple of {what}s, not {type(value).__name__}", option=option)
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, str) or not pattern.match(item) or item in (".", ".."):
            raise ConfigError(f"{item!r} is not a valid {what}", option=option)
        if item in seen:
            raise ConfigError(f"{item!r} is given twice", option=option)
        seen.add(item)


def _check_networks(option: str, value: object) -> None:
    if not isinstance(value, tuple):
        raise ConfigError(f"must be a tuple of networks, not {type(value).__name__}", option=option)
    for item in value:
        if not isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise ConfigError(f"{item!r} is not an IPv4 or IPv6 network", option=option)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The effective configuration; every field is checked when it is built.

    Field names are the uci option names, except `exclude_zones` (uci: the
    list `exclude_zone`). Build with keywords; derive with dataclasses.replace().
    """

    enabled: bool = False
    hook: str = "auto"
    interfaces: tuple[str, ...] = ()
    max_flows: int = 65536
    pending_flows: int = 8192
    sweep_interval: float = 1.0
    tcp_timeout: int = 300
    udp_timeout: int = 60
    offload_udp: str = "yes"
    exclude_src: tuple[IPNetwork, ...] = ()
    exclude_dst: tuple[IPNetwork, ...] = ()
    exclude_zones: tuple[str, ...] = ()
    log_level: str = "info"
    heartbeat_timeout: float = 3.0
    object: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"must be a boolean, not {self.enabled!r}", option="enabled")
        _check_choice("hook", self.hook, HOOKS)
        _check_names("interfaces", self.interfaces, _IFNAME_RE, "interface name")
        _check_range("max_flows", self.max_flows, 1024, 4194304, int)
        _check_range("pending_flows", self.pending_flows, 256, 1048576, int)
        _check_range("sweep_interval", self.sweep_interval, 0.1, 60, float)
        _check_range("tcp_timeout", self.tcp_timeout, 1, 86400, int)
        _check_range("udp_timeout", self.udp_timeout, 1, 86400, int)
        _check_choice("offload_udp", self.offload_udp, OFFLOAD_UDP_MODES)
        _check_networks("exclude_src", self.exclude_src)
        _check_networks("exclude_dst", self.exclude_dst)
        _check_names("exclude_zone", self.exclude_zones, _ZONE_RE, "zone name")
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        _check_range("heartbeat_timeout", self.heartbeat_timeout, 0.5, 60, float)
        if not isinstance(self.object, str) or "\0" in self.object:
            raise ConfigError(f"{self.object!r} is not a path", option="object")
        # Keep the declared types exact: an int where a float is declared.
        for name in ("sweep_interval", "heartbeat_timeout"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, builtins.object]:
        """JSON-able, keyed by uci option name (lists as lists, networks as strings)."""
        return {
            "enabled": self.enabled,
            "hook": self.hook,
            "interfaces": list(self.interfaces),
            "max_flows": self.max_flows,
            "pending_flows": self.pending_flows,
            "sweep_interval": self.sweep_interval,
            "tcp_timeout": self.tcp_timeout,
            "udp_timeout": self.udp_timeout,
            "offload_udp": self.offload_udp,
            "exclude_src": [str(n) for n in self.exclude_src],
            "exclude_dst": [str(n) for n in self.exclude_dst],
            "exclude_zone": list(self.exclude_zones),
            "log_level": self.log_level,
            "heartbeat_timeout": self.heartbeat_timeout,
            "object": self.object,
        }


# uci option name -> Settings field name, where they differ.
_FIELD_OF_OPTION = {"exclude_zone": "exclude_zones"}
_OPTION_OF_FIELD = {v: k for k, v in _FIELD_OF_OPTION.items()}


def format_settings(s: Settings) -> str:
    """The settings for a person: one `option value` per line, names aligned."""
    shown: dict[str, str] = {}
    for name, value in s.to_dict().items():
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, list):
            text = " ".join(str(v) for v in value)
        else:
            text = str(value)
        shown[name] = text
    if not s.interfaces:
        shown["interfaces"] = "(none: the devices of network lan and wan)"
    for name in ("exclude_src", "exclude_dst", "exclude_zone"):
        shown[name] = shown[name] or "(none)"
    if not s.object:
        shown["object"] = "(none: the default locations)"
    width = max(len(name) for name in shown)
    return "\n".join(f"{name:<{width}}  {text}" for name, text in shown.items()) + "\n"


# --------------------------------------------------------------------------
# From uci values to Settings


def _to_bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1 or 0)")


def _to_int(text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


def _to_float(text: str) -> float:
    if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)", text.strip()):
        raise ValueError(f"{text!r} is not a number")
    return float(text)


def _to_word(text: str) -> str:
    return text.strip()


def _to_path(text: str) -> str:
    return text


def _to_network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address or CIDR network") from None


_Single = Callable[[str], object]
# uci option -> converter; single options take one `option`, list options any
# number of `list` lines (or one `option` with blank-separated values).
_SINGLE_OPTIONS: dict[str, _Single] = {
    "enabled": _to_bool,
    "hook": _to_word,
    "max_flows": _to_int,
    "pending_flows": _to_int,
    "sweep_interval": _to_float,
    "tcp_timeout": _to_int,
    "udp_timeout": _to_int,
    "offload_udp": _to_word,
    "log_level": _to_word,
    "heartbeat_timeout": _to_float,
    "object": _to_path,
}
_LIST_OPTIONS: dict[str, _Single] = {
    "interfaces": _to_word,
    "exclude_src": _to_network,
    "exclude_dst": _to_network,
    "exclude_zone": _to_word,
}


def _settings_from_section(section: UciSection, file: str) -> Settings:
    by_name: dict[str, list[UciEntry]] = {}
    for entry in section.entries:
        by_name.setdefault(entry.name, []).append(entry)

    values: dict[str, object] = {}
    line_of: dict[str, int] = {}
    for name, entries in by_name.items():
        first, last = entries[0], entries[-1]
        line_of[name] = first.line

        def fail(message: str, entry: UciEntry, name: str = name) -> ConfigError:
            return ConfigError(message, file=file, line=entry.line, option=name)

        if name in _SINGLE_OPTIONS:
            listed = next((e for e in entries if e.kind == "list"), None)
            if listed is not None:
                raise fail("is a single value: use 'option', not 'list'", listed)
            if len(entries) > 1:
                raise fail(f"given again (first on line {first.line})", entries[1])
            try:
                values[name] = _SINGLE_OPTIONS[name](last.value)
            except ValueError as exc:
                raise fail(str(exc), last) from None
        elif name in _LIST_OPTIONS:
            options = [e for e in entries if e.kind == "option"]
            if options and len(entries) > 1:
                other = entries[1] if entries[0] is options[0] else entries[0]
                raise fail(
                    "use either one 'option' with blank-separated values or 'list' lines",
                    other if other.line > options[0].line else options[0],
                )
            items: list[object] = []
            for entry in entries:
                parts = entry.value.split() if entry.kind == "option" else [entry.value]
                if entry.kind == "list" and not entry.value.strip():
                    raise fail("empty list value", entry)
                for part in parts:
                    try:
                        items.append(_LIST_OPTIONS[name](part))
                    except ValueError as exc:
                        raise fail(str(exc), entry) from None
            values[name] = tuple(items)
        else:
            known = ", ".join(sorted([*_SINGLE_OPTIONS, *_LIST_OPTIONS]))
            raise fail(f"unknown option (known: {known})", first)

    kwargs = {_FIELD_OF_OPTION.get(k, k): v for k, v in values.items()}
    try:
        return Settings(**kwargs)  # type: ignore[arg-type]
    except ConfigError as exc:
        line = line_of.get(exc.option, section.line)
        raise ConfigError(exc.reason, file=file, line=line, option=exc.option) from None


def load_settings(path: str | None = None) -> Settings:
    """Read the agent's settings from a uci file.

    `path` None: DEFAULT_CONFIG_PATH if it exists, else the defaults. A path
    given explicitly must exist. The settings are the first section of type
    `offloader` (named `main` in the shipped file; anonymous works too); a
    file without one gives the defaults. Any other section, an unknown option,
    a bad value, a single option given twice or as a `list` is a ConfigError
    naming file, line and option.
    """
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            return Settings()
        path = DEFAULT_CONFIG_PATH
    sections = read_uci(path)
    main: UciSection | None = None
    for section in sections:
        if section.type != SECTION_TYPE:
            raise ConfigError(
                f"unknown section type {section.type!r} (expected {SECTION_TYPE!r})",
                file=path,
                line=section.line,
            )
        if main is not None:
            raise ConfigError(
                f"a second {SECTION_TYPE!r} section (the first is on line {main.line}); "
                "only one is read",
                file=path,
                line=section.line,
            )
        main = section
    if main is None:
        return Settings()
    return _settings_from_section(main, path)


def settings_field_option(field_name: str) -> str:
    """The uci option name of a Settings field (for messages about CLI overrides)."""
    if field_name not in {f.name for f in fields(Settings)}:
        raise KeyError(field_name)
    return _OPTION_OF_FIELD.get(field_name, field_name)


# --------------------------------------------------------------------------
# Other packages' files: network and firewall


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def network_devices(
    network_path: str = DEFAULT_NETWORK_PATH,
    interfaces: tuple[str, ...] = ("lan", "wan"),
) -> tuple[str, ...]:
    """The devices of the named netifd interfaces, in order, without repeats.

    Reads each `config interface` section's `device` option (OpenWrt 21.02 and
    later) or the legacy `ifname` (blank-separated; `type bridge` makes it
    `br-NAME`). A device `@other` is an alias and resolves to the devices of
    interface `other`. Interfaces that are not defined are skipped; a missing
    file gives () so the caller can say that no interface is known.
    """
    if not os.path.exists(network_path):
        return ()
    by_name = {
        s.name: s for s in read_uci(network_path) if s.type == "interface" and s.name is not None
    }

    def devices_of(name: str, seen: frozenset[str]) -> Iterator[str]:
        section = by_name.get(name)
        if section is None or name in seen:
            return
        device = section.get("device")
        if device is None and section.get("type") == "bridge":
            yield f"br-{name}"
            return
        names = device.split() if device is not None else section.values("ifname")
        for dev in names:
            if dev.startswith("@"):
                yield from devices_of(dev[1:], seen | {name})
            else:
                yield dev

    return _unique(dev for iface in interfaces for dev in devices_of(iface, frozenset()))


def zone_networks(
    firewall_path: str = DEFAULT_FIREWALL_PATH,
    zones: tuple[str, ...] = (),
) -> tuple[str, ...]:
    """The netifd network names covered by the named fw4 zones.

    A zone's `network` may be `list` lines or one blank-separated `option`.
    A zone that is not defined is a ConfigError: excluding it was asked for, and
    silently offloading its traffic would be the wrong failure.
    """
    if not zones:
        return ()
    sections = [s for s in read_uci(firewall_path) if s.type == "zone"]
    networks: list[str] = []
    for zone in zones:
        matches = [s for s in sections if s.get("name") == zone]
        if not matches:
            raise ConfigError(
                f"zone {zone!r} is not defined in the firewall configuration",
                file=firewall_path,
                option="exclude_zone",
            )
        for section in matches:
            networks.extend(section.values("network"))
    return _unique(networks)


def apply_overrides(settings: Settings, pairs: Iterable[str]) -> Settings:
    """Settings with ``option=value`` pairs from the command line applied,
    converted and checked like the file's options. A list option given more
    than once collects its values; given at all, it replaces the file's list."""
    singles: dict[str, object] = {}
    lists: dict[str, list[object]] = {}
    for pair in pairs:
        option, sep, text = pair.partition("=")
        option = option.strip()
        if not sep:
            raise ConfigError("expected OPTION=VALUE", file="command line", option=option)
        try:
            if option in _SINGLE_OPTIONS:
                singles[option] = _SINGLE_OPTIONS[option](text)
            elif option in _LIST_OPTIONS:
                lists.setdefault(option, []).extend(
                    _LIST_OPTIONS[option](v) for v in text.split() if v)
            else:
                raise ValueError("unknown option")
        except ValueError as exc:
            raise ConfigError(str(exc), file="command line", option=option) from None
    changes: dict[str, object] = dict(singles)
    for option, values in lists.items():
        changes["exclude_zones" if option == "exclude_zone" else option] = tuple(values)
    try:
        return replace(settings, **changes)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(exc.reason, file="command line", option=exc.option) from None
