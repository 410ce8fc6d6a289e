"""Struct layouts and constants of the datapath, read from bpf/offload.h.

The shared header is the only contract between C and Python: this module
feeds its type definitions to cffi and evaluates its ``#define`` constants,
so no second copy of any struct exists here. The header's
``_Static_assert(sizeof(...))`` lines are checked against cffi's sizes at
import, which catches a header that cffi and clang read differently.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import re
import struct
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cffi

from .errors import OffloadError

_HEADER_NAMES = ("offload.h",)
_SEARCH = (
    Path(__file__).resolve().parent,  # installed next to the package (symlink in the tree)
    Path(__file__).resolve().parent.parent / "bpf",
    Path("/usr/share/ebpf-offloader"),
)

_TYPEDEFS = """
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;
typedef uint16_t __be16; typedef uint32_t __be32;
"""

_DEFINE = re.compile(r"^#define\s+(OFL_\w+)\s+(.+?)\s*(?:/\*.*)?$")
_DSA_PROTO = re.compile(r"OFL_DSA_([A-Z0-9]+)")  # not OFL_DSA_PORT_NONE, OFL_DSA_MTK_LEN
_ASSERT = re.compile(r"_Static_assert\(sizeof\(struct (\w+)\) == (\d+)")
_LAYOUT_ITEM = re.compile(r"[SF]\((\w+)(?:,\s*(\w+))?\)")
_BINOPS: dict[type, Any] = {
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.BitOr: operator.or_,
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
}


def header_path() -> Path:
    """Where the shared header is: next to this package, or in the source tree."""
    for base in _SEARCH:
        for name in _HEADER_NAMES:
            candidate = base / name
            if candidate.is_file():
                return candidate
    raise OffloadError("bpf/offload.h not found next to the offloader package")


def _eval_const(text: str) -> int:
    """Evaluate a constant expression such as ``(1U << 2)`` or ``0xff``."""
    expr = re.sub(r"(?<=[0-9a-fA-F])[uUlL]+\b", "", text.strip())

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return int(_BINOPS[type(node.op)](walk(node.left), walk(node.right)))
        raise ValueError(f"not a constant expression: {text!r}")

    return walk(ast.parse(expr, mode="eval").body)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


class Layout:
    """cffi view of the shared header: ``ffi``, constants and struct sizes."""

    def __init__(self, path: Path) -> None:
        raw = path.read_text().replace("\\\n", " ")  # join continued #define lines
        self.path = path
        self.consts: dict[str, int] = {}
        for line in raw.splitlines():
            m = _DEFINE.match(line.strip())
            if m:
                self.consts[m.group(1)] = _eval_const(m.group(2))
        body = [
            line
            for line in _strip_comments(raw).splitlines()
            if not line.lstrip().startswith(("#", "_Static_assert"))
        ]
        self.ffi = cffi.FFI()
        self.ffi.cdef(_TYPEDEFS + "\n".join(body))
        for name, size in _ASSERT.findall(raw):
            got = self.ffi.sizeof(f"struct {name}")
            if got != int(size):
                raise OffloadError(f"{path}: struct {name} is {got} bytes to cffi, header says {size}")
        for match in re.finditer(r"enum (\w+)\s*{", raw):
            self.consts.update(self.ffi.typeof(f"enum {match.group(1)}").relements)
        self.stamp_table = self._stamp_table(raw)

    def _stamp_table(self, raw: str) -> tuple[int, ...]:
        """The layout stamp of this header (offload.h, OFL_LAYOUT): the
        version, then per struct its size and each field's (offset, size).
        Every field of every listed struct must be named in the list."""
        m = re.search(r"#define OFL_LAYOUT\(S, F\)(.*)", raw)
        if not m:
            raise OffloadError(f"{self.path}: no OFL_LAYOUT list")
        table = [self.consts["OFL_LAYOUT_VERSION"]]
        listed: dict[str, list[str]] = {}
        for name, field in _LAYOUT_ITEM.findall(m.group(1)):
            ctype = f"struct {name}"
            if not field:
                listed[name] = []
                table.append(self.ffi.sizeof(ctype))
                continue
            listed[name].append(field)
            ftype = dict(self.ffi.typeof(ctype).fields)[field].type
            table += [self.ffi.offsetof(ctype, field), self.ffi.sizeof(ftype)]
        for name, _ in _ASSERT.findall(raw):
            fields = [f for f, _ in self.ffi.typeof(f"struct {name}").fields]
            if listed.get(name) != fields:
                raise OffloadError(f"{self.path}: OFL_LAYOUT lists {listed.get(name)} for "
                                   f"struct {name}, which has {fields}")
        return tuple(table)

    @property
    def stamp(self) -> str:
        """A short name of the stamp table, for messages."""
        return stamp_name(self.stamp_table)

    def dsa_protos(self) -> Mapping[str, int]:
        """Switch tag protocols by the kernel's name (sysfs ``dsa/tagging``):
        ``OFL_DSA_<NAME>`` is the protocol ``<name>``, ``none`` included."""
        return MappingProxyType({m.group(1).lower(): value for name, value in self.consts.items()
                                 if (m := _DSA_PROTO.fullmatch(name))})

    def const(self, name: str) -> int:
        """A ``#define`` constant or an enum value of the header."""
        return self.consts[name]

    def new(self, ctype: str, init: Any = None) -> Any:
        return self.ffi.new(f"{ctype} *", init)

    def sizeof(self, ctype: str) -> int:
        return int(self.ffi.sizeof(ctype))

    def to_bytes(self, obj: Any) -> bytes:
        return bytes(self.ffi.buffer(obj))

    def from_bytes(self, ctype: str, data: bytes) -> Any:
        obj = self.ffi.new(f"{ctype} *")
        self.ffi.memmove(obj, data, self.ffi.sizeof(ctype))
        return obj


def stamp_name(table: tuple[int, ...]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(table)}H", *table)).hexdigest()[:12]


def object_stamp(path: str) -> tuple[int, ...] | None:
    """The layout stamp table in a BPF object's ``ofl_layout`` section, or
    None when it has none (an object from before the stamp, or not ours).
    Read from the ELF file itself: nothing is loaded."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELFCLASS64 (BPF objects are)
        return None
    end = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(end + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(end + "3H", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _, _, _, off, size = struct.unpack_from(end + "IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if data[str_off + name : data.index(b"\0", str_off + name)] == b"ofl_layout":
            return struct.unpack_from(f"{end}{size // 2}H", data, off)
    return None


@cache
def layout() -> Layout:
    """The layout of the shared header (parsed once per process)."""
    return Layout(header_path())
