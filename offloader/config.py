"""The agent's settings and the uci reader they come from.

OpenWrt keeps configuration in /etc/config/<package> files in uci syntax.
The agent parses them itself (no libuci binding) so that the same code runs on
a router, on a Debian lab box and in the unit tests.

    parse_uci()        text -> [UciSection]: the generic uci syntax
    Settings           frozen, keyword-only; validates on construction, so a
                       CLI override `dataclasses.replace(s, hook="tc")` is
                       checked too. Each field is one uci option, described
                       once by its Option entry (OPTIONS, in field order)
    load_settings()    /etc/config/ebpf-offloader -> Settings, every value checked
    apply_overrides()  `-o OPTION=VALUE` pairs on top of Settings
    redecide_needed()  whether a new Settings makes the agent decide every flow again
    network_devices()  the devices of /etc/config/network's lan and wan
    zone_networks()    the networks of fw4 zones named in exclude_zone

A new option is one field of Settings (its `_option(...)` entry), one row in
docs/configuration.md and a test; parsing, overrides, output and the reload
rule follow from the entry.

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
from typing import Any, Literal, TypeVar

from offloader.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/config/ebpf-offloader"
DEFAULT_NETWORK_PATH = "/etc/config/network"
DEFAULT_FIREWALL_PATH = "/etc/config/firewall"

# The uci section type that holds the agent's settings.
SECTION_TYPE = "offloader"

HOOKS = ("auto", "xdp", "xdpgeneric", "tc", "hybrid")
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
# Group names as shadow-utils and BusyBox addgroup accept them.
_GROUP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")


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


_BLANKS = " \t\r\f\v"


class _Tokenizer:
    """Splits one uci line into words, the way libuci's parser does.

    Words are separated by blanks; single quotes take everything literally,
    double quotes and bare words honour backslash escapes; quoted and bare parts
    that touch form one word (`a'b c'` is `ab c`); `#` where a word would start
    begins a comment. A cursor (`pos`) walks the line; each helper moves it
    past what it read.
    """

    def __init__(self, text: str, file: str, line: int) -> None:
        self.text = text
        self.file = file
        self.line = line
        self.pos = 0

    def _error(self, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line)

    def words(self) -> list[str]:
        text, n = self.text, len(self.text)
        words: list[str] = []
        self.pos = 0
        while True:
            while self.pos < n and text[self.pos] in _BLANKS:
                self.pos += 1
            if self.pos >= n or text[self.pos] == "#":
                return words
            if text[self.pos] == ";":
                raise self._error("';' statement separators are not supported, use one per line")
            words.append(self._word())

    def _word(self) -> str:
        text, n = self.text, len(self.text)
        parts: list[str] = []
        while self.pos < n and text[self.pos] not in _BLANKS:
            ch = text[self.pos]
            if ch == "'":
                parts.append(self._single_quoted())
            elif ch == '"':
                parts.append(self._double_quoted())
            elif ch == "\\":
                parts.append(self._escaped("backslash at the end of the line"))
            else:
                parts.append(ch)
                self.pos += 1
        return "".join(parts)

    def _single_quoted(self) -> str:
        end = self.text.find("'", self.pos + 1)
        if end < 0:
            raise self._error("unterminated single quote")
        part = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return part

    def _double_quoted(self) -> str:
        text, n = self.text, len(self.text)
        parts: list[str] = []
        self.pos += 1
        while True:
            if self.pos >= n:
                raise self._error("unterminated double quote")
            ch = text[self.pos]
            if ch == '"':
                self.pos += 1
                return "".join(parts)
            if ch == "\\":
                parts.append(self._escaped("unterminated double quote"))
            else:
                parts.append(ch)
                self.pos += 1

    def _escaped(self, at_end: str) -> str:
        """The character after the backslash at `pos`; `at_end` if there is none."""
        if self.pos + 1 >= len(self.text):
            raise self._error(at_end)
        ch = self.text[self.pos + 1]
        self.pos += 2
        return ch


def _config_section(args: list[str], file: str, lineno: int) -> UciSection:
    """The section a `config TYPE [NAME]` line opens."""
    if not args or len(args) > 2:
        raise ConfigError("'config' takes a section type and an optional name",
                          file=file, line=lineno)
    if not _NAME_RE.match(args[0]):
        raise ConfigError(f"invalid section type {args[0]!r}", file=file, line=lineno)
    name = args[1] if len(args) == 2 else None
    if name is not None and not _NAME_RE.match(name):
        raise ConfigError(f"invalid section name {name!r} (letters, digits and '_' only)",
                          file=file, line=lineno)
    return UciSection(type=args[0], name=name, line=lineno)


def _entry(keyword: str, args: list[str], file: str, lineno: int) -> UciEntry:
    """The entry an `option NAME VALUE` or `list NAME VALUE` line gives."""
    if not args:
        raise ConfigError(f"'{keyword}' without a name", file=file, line=lineno)
    name = args[0]
    if not _NAME_RE.match(name):
        raise ConfigError(f"invalid option name {name!r} (letters, digits and '_' only)",
                          file=file, line=lineno)
    if len(args) == 1:
        raise ConfigError(f"'{keyword}' without a value", file=file, line=lineno, option=name)
    if len(args) > 2:
        raise ConfigError(
            f"{len(args) - 1} values where one is expected (quote values with blanks)",
            file=file, line=lineno, option=name,
        )
    kind: Literal["option", "list"] = "option" if keyword == "option" else "list"
    return UciEntry(kind=kind, name=name, value=args[1], line=lineno)


def parse_uci(text: str, file: str) -> list[UciSection]:
    """Parse uci text into its sections, in file order.

    Understands `package`, `config TYPE [NAME]`, `option NAME VALUE` and
    `list NAME VALUE`, quoting, escapes, comments and blank lines. A syntax error
    is a ConfigError carrying `file` and the 1-based line number.
    """
    sections: list[UciSection] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        words = _Tokenizer(raw, file, lineno).words()
        if not words:
            continue
        keyword, args = words[0], words[1:]
        if keyword == "package":
            if len(args) != 1:
                raise ConfigError("'package' takes exactly one name", file=file, line=lineno)
        elif keyword == "config":
            sections.append(_config_section(args, file, lineno))
        elif keyword in ("option", "list"):
            if not sections:
                raise ConfigError(f"'{keyword}' before the first 'config' line",
                                  file=file, line=lineno)
            sections[-1].entries.append(_entry(keyword, args, file, lineno))
        else:
            raise ConfigError(
                f"unknown keyword {keyword!r} (expected config, option or list)",
                file=file, line=lineno,
            )
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
# From uci text to values: one converter per kind of value. Each takes one
# uci value (for a list option: one item) and raises ValueError saying why not.


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


# --------------------------------------------------------------------------
# Checks of Python values: each returns the value to keep (an int given for a
# float becomes a float) or raises ValueError saying what is wrong.

_Check = Callable[[Any], object]


def _num(value: float) -> str:
    """A number as a person writes it: 4194304, 0.5."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _is_boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be a boolean, not {value!r}")
    return value


def _one_of(choices: tuple[str, ...]) -> _Check:
    def check(value: object) -> object:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def _in_range(lo: float, hi: float, kind: type[int] | type[float]) -> _Check:
    what = "an integer" if kind is int else "a number"
    accepted = (int,) if kind is int else (int, float)

    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, accepted) or not math.isfinite(value):
            raise ValueError(f"must be {what} from {_num(lo)} to {_num(hi)}, not {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{_num(value)} is out of range: must be {_num(lo)} to {_num(hi)}")
        return kind(value)

    return check


def _power_of_two(lo: int, hi: int) -> _Check:
    in_range = _in_range(lo, hi, int)

    def check(value: object) -> object:
        n = in_range(value)
        if not isinstance(n, int) or n & (n - 1):
            raise ValueError(f"{n} is not a power of two")
        return n

    return check


def _names(pattern: re.Pattern[str], what: str) -> _Check:
    def check(value: object) -> object:
        if not isinstance(value, tuple):
            raise ValueError(f"must be a tuple of {what}s, not {type(value).__name__}")
        seen: set[str] = set()
        for item in value:
            if not isinstance(item, str) or not pattern.match(item) or item in (".", ".."):
                raise ValueError(f"{item!r} is not a valid {what}")
            if item in seen:
                raise ValueError(f"{item!r} is given twice")
            seen.add(item)
        return value

    return check


def _networks(value: object) -> object:
    if not isinstance(value, tuple):
        raise ValueError(f"must be a tuple of networks, not {type(value).__name__}")
    for item in value:
        if not isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise ValueError(f"{item!r} is not an IPv4 or IPv6 network")
    return value


def _group_name(value: object) -> object:
    if not isinstance(value, str) or (value and not _GROUP_RE.match(value)):
        raise ValueError(f"{value!r} is not a group name")
    return value


def _is_path(value: object) -> object:
    if not isinstance(value, str) or "\0" in value:
        raise ValueError(f"{value!r} is not a path")
    return value


# --------------------------------------------------------------------------
# The option schema and Settings


@dataclass(frozen=True)
class Option:
    """One uci option, described once. Parsing the uci section, `-o`
    overrides, Settings' checks, to_dict(), format_settings(), the reload rule
    and the docs test all read this entry."""

    name: str  # the uci option name
    field: str  # the Settings field that holds it
    default: object
    convert: Callable[[str], object]  # one uci value (a list option: one item) -> Python
    check: _Check  # the Python value -> the value kept; ValueError says what is wrong
    many: bool  # a list option: `list` lines, or one `option` with blank-separated values
    redecides: bool  # a change makes the agent decide every flow again
    doc: str  # one line for people
    empty: str  # what format_settings() shows when the value is empty

    @property
    def default_text(self) -> str:
        """The default as it is written in a uci file ("" when empty)."""
        return _uci_text(self.default)

    def json_value(self, value: Any) -> object:
        """`value` of this option as JSON takes it (lists, networks as strings)."""
        if self.many:
            return [item if isinstance(item, str) else str(item) for item in value]
        return value


def _uci_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return _num(value)
    if isinstance(value, (tuple, list)):
        return " ".join(str(item) for item in value)
    return str(value)


_T = TypeVar("_T")
_OPTION_KEY = "uci_option"


def _option(
    default: _T,
    convert: Callable[[str], object],
    check: _Check,
    *,
    doc: str,
    uci: str = "",
    many: bool = False,
    redecides: bool = False,
    empty: str = "(none)",
) -> _T:
    """A Settings field that is a uci option (named like the field unless
    `uci` says otherwise); OPTIONS collects them."""
    spec = Option(name=uci, field="", default=default, convert=convert, check=check, many=many,
                  redecides=redecides, doc=doc, empty=empty)
    return field(default=default, metadata={_OPTION_KEY: spec})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The effective configuration; every field is checked when it is built.

    Each field is one uci option, described by its `_option(...)` entry below;
    field names are the uci option names, except `exclude_zones` (uci: the
    list `exclude_zone`). Build with keywords; derive with dataclasses.replace().
    """

    enabled: bool = _option(
        False, _to_bool, _is_boolean,
        doc="whether the OpenWrt service starts the agent (`run` itself ignores it)")
    hook: str = _option(
        "auto", _to_word, _one_of(HOOKS),
        doc="where the datapath attaches: auto, xdp, xdpgeneric, tc or hybrid")
    interfaces: tuple[str, ...] = _option(
        (), _to_word, _names(_IFNAME_RE, "interface name"), many=True,
        empty="(none: the devices of network lan and wan)",
        doc="the devices to attach to; none: those of network lan and wan")
    max_flows: int = _option(
        65536, _to_int, _in_range(1024, 4194304, int),
        doc="size of the map of offloaded flows")
    pending_flows: int = _option(
        8192, _to_int, _in_range(256, 1048576, int),
        doc="size of the LRU map of new connections waiting for a decision")
    event_ring_kib: int = _option(
        512, _to_int, _power_of_two(64, 65536),
        doc="KiB of the ring buffer that reports new connections to the agent (a power of two)")
    sweep_interval: float = _option(
        1.0, _to_float, _in_range(0.1, 60, float),
        doc="seconds between the agent's walks of the flow map")
    tcp_timeout: int = _option(
        300, _to_int, _in_range(1, 86400, int),
        doc="seconds without packets before an offloaded TCP flow goes back to the kernel")
    udp_timeout: int = _option(
        60, _to_int, _in_range(1, 86400, int),
        doc="seconds without packets before an offloaded UDP flow goes back to the kernel")
    offload_udp: str = _option(
        "yes", _to_word, _one_of(OFFLOAD_UDP_MODES), redecides=True,
        doc="offload UDP: yes, assured (once conntrack saw replies) or no")
    exclude_src: tuple[IPNetwork, ...] = _option(
        (), _to_network, _networks, many=True, redecides=True,
        doc="never offload connections from these addresses or networks")
    exclude_dst: tuple[IPNetwork, ...] = _option(
        (), _to_network, _networks, many=True, redecides=True,
        doc="never offload connections to these addresses or networks")
    exclude_zones: tuple[str, ...] = _option(
        (), _to_word, _names(_ZONE_RE, "zone name"), uci="exclude_zone", many=True,
        redecides=True,
        doc="never offload connections through these fw4 zones")
    log_level: str = _option(
        "info", _to_word, _one_of(LOG_LEVELS),
        doc="what the agent logs: debug, info, warning or error")
    heartbeat_timeout: float = _option(
        3.0, _to_float, _in_range(0.5, 60, float),
        doc="seconds without the agent's heartbeat before the datapath passes everything")
    object: str = _option(
        "", _to_path, _is_path, empty="(none: the default locations)",
        doc="the BPF object to load; empty: the default locations")
    early_drop: bool = _option(
        True, _to_bool, _is_boolean,
        doc="drop in the datapath what the kernel drops anyway: tuples whose route drops them"
            " silently, and tuples learned from the ruleset (docs/design.md, Early drop)")
    early_drop_packets: int = _option(
        16, _to_int, _in_range(8, 1_000_000, int),
        doc="a tuple is learned as dropped after at least this many packets without a"
            " conntrack entry (more than any TCP SYN or DNS retry schedule sends)")
    early_drop_after_ms: int = _option(
        200, _to_int, _in_range(50, 60_000, int),
        doc="and no earlier than this many milliseconds after its first packet")
    early_drop_time: int = _option(
        30, _to_int, _in_range(1, 3600, int),
        doc="seconds a learned or route drop lasts before the kernel judges the tuple again")
    early_drop_entries: int = _option(
        4096, _to_int, _in_range(256, 1048576, int),
        doc="size of the LRU map of early drops (apart from the flow map)")
    control_group: str = _option(
        "", _to_word, _group_name, empty="(none: root only)",
        doc="besides root, members of this group may use status and flush")

    def __post_init__(self) -> None:
        for option in OPTIONS:
            try:
                kept = option.check(getattr(self, option.field))
            except ValueError as exc:
                raise ConfigError(str(exc), option=option.name) from None
            object.__setattr__(self, option.field, kept)

    def to_dict(self) -> dict[str, builtins.object]:
        """JSON-able, keyed by uci option name (lists as lists, networks as strings)."""
        return {o.name: o.json_value(getattr(self, o.field)) for o in OPTIONS}


def _schema() -> tuple[Option, ...]:
    options = []
    for f in fields(Settings):
        spec: Option = f.metadata[_OPTION_KEY]
        options.append(replace(spec, name=spec.name or f.name, field=f.name))
    return tuple(options)


# Every uci option, in the order of Settings' fields (and of the output).
OPTIONS: tuple[Option, ...] = _schema()
_BY_NAME = {o.name: o for o in OPTIONS}


def settings_field_option(field_name: str) -> str:
    """The uci option name of a Settings field (for messages about CLI overrides)."""
    for option in OPTIONS:
        if option.field == field_name:
            return option.name
    raise KeyError(field_name)


def redecide_needed(old: Settings, new: Settings) -> bool:
    """Whether going from `old` to `new` changes what may be offloaded, so
    that the agent must decide every flow again (on SIGHUP)."""
    return any(
        getattr(old, o.field) != getattr(new, o.field) for o in OPTIONS if o.redecides
    )


def format_settings(s: Settings) -> str:
    """The settings for a person: one `option value` per line, names aligned."""
    shown: dict[str, str] = {}
    values = s.to_dict()
    for option in OPTIONS:
        value = values[option.name]
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, list):
            text = " ".join(str(v) for v in value)
        else:
            text = str(value)
        shown[option.name] = text or option.empty
    width = max(len(name) for name in shown)
    return "\n".join(f"{name:<{width}}  {text}" for name, text in shown.items()) + "\n"


def describe_options() -> str:
    """One line per option, `name=DEFAULT  what it does`, for `--help`."""
    shown = [(f"{o.name}={o.default_text}", o.doc) for o in OPTIONS]
    width = max(len(name) for name, _ in shown)
    return "\n".join(f"  {name:<{width}}  {doc}" for name, doc in shown)


# --------------------------------------------------------------------------
# From a uci section or the command line to Settings


def _entry_error(message: str, entry: UciEntry, file: str) -> ConfigError:
    return ConfigError(message, file=file, line=entry.line, option=entry.name)


def _single_value(option: Option, entries: list[UciEntry], file: str) -> object:
    """A single option's value: one `option` line."""
    listed = next((e for e in entries if e.kind == "list"), None)
    if listed is not None:
        raise _entry_error("is a single value: use 'option', not 'list'", listed, file)
    if len(entries) > 1:
        raise _entry_error(f"given again (first on line {entries[0].line})", entries[1], file)
    try:
        return option.convert(entries[0].value)
    except ValueError as exc:
        raise _entry_error(str(exc), entries[0], file) from None


def _list_value(option: Option, entries: list[UciEntry], file: str) -> tuple[object, ...]:
    """A list option's items: `list` lines, or one `option` with blank-separated values."""
    options = [e for e in entries if e.kind == "option"]
    if options and len(entries) > 1:
        other = entries[1] if entries[0] is options[0] else entries[0]
        raise _entry_error(
            "use either one 'option' with blank-separated values or 'list' lines",
            other if other.line > options[0].line else options[0],
            file,
        )
    items: list[object] = []
    for entry in entries:
        if entry.kind == "list" and not entry.value.strip():
            raise _entry_error("empty list value", entry, file)
        parts = entry.value.split() if entry.kind == "option" else [entry.value]
        for part in parts:
            try:
                items.append(option.convert(part))
            except ValueError as exc:
                raise _entry_error(str(exc), entry, file) from None
    return tuple(items)


def _settings_from_section(section: UciSection, file: str) -> Settings:
    by_name: dict[str, list[UciEntry]] = {}
    for entry in section.entries:
        by_name.setdefault(entry.name, []).append(entry)

    values: dict[str, object] = {}
    for name, entries in by_name.items():
        option = _BY_NAME.get(name)
        if option is None:
            known = ", ".join(sorted(_BY_NAME))
            raise _entry_error(f"unknown option (known: {known})", entries[0], file)
        read = _list_value if option.many else _single_value
        values[option.field] = read(option, entries, file)
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ConfigError as exc:
        given = by_name.get(exc.option)
        line = given[0].line if given else section.line
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


def apply_overrides(settings: Settings, pairs: Iterable[str]) -> Settings:
    """Settings with ``option=value`` pairs from the command line applied,
    converted and checked like the file's options. A list option given more
    than once collects its values; given at all, it replaces the file's list."""
    singles: dict[str, object] = {}
    lists: dict[str, list[object]] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError("expected OPTION=VALUE", file="command line", option=name)
        option = _BY_NAME.get(name)
        try:
            if option is None:
                raise ValueError("unknown option")
            if option.many:
                items = lists.setdefault(option.field, [])
                items.extend(option.convert(v) for v in text.split() if v)
            else:
                singles[option.field] = option.convert(text)
        except ValueError as exc:
            raise ConfigError(str(exc), file="command line", option=name) from None
    changes = {**singles, **{f: tuple(items) for f, items in lists.items()}}
    try:
        return replace(settings, **changes)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(exc.reason, file="command line", option=exc.option) from None


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

