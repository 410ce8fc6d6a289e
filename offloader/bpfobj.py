"""A small ctypes binding over libbpf.so.1: objects, maps, ring buffers, hooks.

Every function gets explicit ``restype``/``argtypes`` (a pointer returned as
the default ``int`` would be truncated). libbpf reports errors as negative
errno values or NULL with ``errno`` set; both become :class:`BpfError`
subclasses here, the only place that translates them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import stat
from collections.abc import Callable, Iterator
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_int,
    c_size_t,
    c_uint32,
    c_void_p,
)
from dataclasses import dataclass
from pathlib import Path

from .errors import AttachError, BpfError, MapError, ObjectLoadError

log = logging.getLogger(__name__)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_FS_MAGIC = 0xCAFE4A11

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


class _TestRunOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class _TcHook(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),
        ("parent", c_uint32),
        ("_pad", c_uint32),
    ]


class _TcOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
        ("_pad", c_uint32),
    ]


class _BatchOpts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def _sig(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


class _Libbpf:
    """libbpf.so.1 with typed signatures and a log collector."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self.lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise BpfError(f"cannot load libbpf ({name}): install libbpf1") from exc
        self.libc = ctypes.CDLL(None)
        lib = self.lib
        vp, ip = c_void_p, c_int
        _sig(lib, "bpf_object__open_file", vp, c_char_p, vp)
        _sig(lib, "bpf_object__load", ip, vp)
        _sig(lib, "bpf_object__close", None, vp)
        _sig(lib, "bpf_object__find_map_by_name", vp, vp, c_char_p)
        _sig(lib, "bpf_object__find_program_by_name", vp, vp, c_char_p)
        _sig(lib, "bpf_program__fd", ip, vp)
        _sig(lib, "bpf_map__fd", ip, vp)
        _sig(lib, "bpf_map__set_max_entries", ip, vp, c_uint32)
        _sig(lib, "bpf_map__max_entries", c_uint32, vp)
        _sig(lib, "bpf_map__set_pin_path", ip, vp, c_char_p)
        _sig(lib, "bpf_map__unpin", ip, vp, c_char_p)
        _sig(lib, "bpf_map__key_size", c_uint32, vp)
        _sig(lib, "bpf_map__value_size", c_uint32, vp)
        _sig(lib, "bpf_map_lookup_elem", ip, ip, vp, vp)
        _sig(lib, "bpf_map_update_elem", ip, ip, vp, vp, ctypes.c_uint64)
        _sig(lib, "bpf_map_delete_elem", ip, ip, vp)
        _sig(lib, "bpf_map_get_next_key", ip, ip, vp, vp)
        _sig(lib, "bpf_map_lookup_batch", ip, ip, vp, vp, vp, vp, POINTER(c_uint32), vp)
        _sig(lib, "bpf_map_delete_batch", ip, ip, vp, POINTER(c_uint32), vp)
        _sig(lib, "bpf_obj_get", ip, c_char_p)
        _sig(lib, "bpf_prog_test_run_opts", ip, ip, vp)
        _sig(lib, "bpf_xdp_attach", ip, ip, ip, c_uint32, vp)
        _sig(lib, "bpf_xdp_detach", ip, ip, c_uint32, vp)
        _sig(lib, "bpf_xdp_query_id", ip, ip, ip, POINTER(c_uint32))
        _sig(lib, "bpf_tc_hook_create", ip, vp)
        _sig(lib, "bpf_tc_hook_destroy", ip, vp)
        _sig(lib, "bpf_tc_attach", ip, vp, vp)
        _sig(lib, "bpf_tc_detach", ip, vp, vp)
        _sig(lib, "bpf_tc_query", ip, vp, vp)
        _sig(lib, "ring_buffer__new", vp, ip, _SAMPLE_FN, vp, vp)
        _sig(lib, "ring_buffer__consume", ip, vp)
        _sig(lib, "ring_buffer__epoll_fd", ip, vp)
        _sig(lib, "ring_buffer__free", None, vp)
        _sig(lib, "libbpf_set_print", vp, _PRINT_FN)
        self.libc.vsnprintf.restype = c_int
        self.libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
        self.messages: list[str] = []
        self._print_cb = _PRINT_FN(self._on_print)
        lib.libbpf_set_print(self._print_cb)

    def _on_print(self, level: int, fmt: bytes | None, args: int | None) -> int:
        buf = ctypes.create_string_buffer(4096)
        n = self.libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace")
        self.messages.append(text)
        del self.messages[:-2000]  # a verifier log can be long; keep its tail
        log.debug("libbpf: %s", text.rstrip())
        return int(n)

    def take_messages(self) -> str:
        text = "".join(self.messages)
        self.messages.clear()
        return text


_LIB: _Libbpf | None = None


def libbpf() -> _Libbpf:
    """The process-wide libbpf handle (loaded on first use)."""
    global _LIB
    if _LIB is None:
        _LIB = _Libbpf()
    return _LIB


def _check(ret: int, what: str, exc: type[BpfError] = BpfError) -> int:
    if ret < 0:
        raise exc(what, errno=-ret)
    return ret


class Map:
    """A BPF map by fd, with fixed key and value sizes."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int, max_entries: int):
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries

    def _key(self, key: bytes) -> bytes:
        """``key`` itself, checked: a key and a value go to the kernel as the
        bytes object's own buffer (libbpf only reads them), without a copy
        (a copy into a ctypes buffer was about a microsecond of the 4-6 of
        an update, which the agent makes twice per new flow)."""
        if len(key) != self.key_size:
            raise MapError(f"{self.name}: key is {len(key)} bytes, map wants {self.key_size}")
        return bytes(key)  # the same object when it is bytes already

    def lookup(self, key: bytes, value_size: int | None = None) -> bytes | None:
        """The value for ``key``, or None. Per-CPU maps need ``value_size``."""
        size = value_size or self.value_size
        val = ctypes.create_string_buffer(size)
        ret = libbpf().lib.bpf_map_lookup_elem(self.fd, self._key(key), val)
        if ret == -2:  # ENOENT
            return None
        _check(ret, f"lookup in {self.name}", MapError)
        return val.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_size:
            raise MapError(f"{self.name}: value is {len(value)} bytes, map wants {self.value_size}")
        ret = libbpf().lib.bpf_map_update_elem(self.fd, self._key(key), bytes(value), flags)
        _check(ret, f"update of {self.name}", MapError)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was not there."""
        ret = libbpf().lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -2:
            return False
        _check(ret, f"delete from {self.name}", MapError)
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key, walked with get_next_key (use items() for bulk reads)."""
        prev: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        for _ in range(self.max_entries + 1):
            ret = libbpf().lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if ret == -2:
                return
            _check(ret, f"walk of {self.name}", MapError)
            yield nxt.raw
            prev = ctypes.create_string_buffer(nxt.raw, self.key_size)

    def batches(self, batch: int = 1024) -> Iterator[tuple[bytes, bytes, int]]:
        """The whole map as (keys, values, count) chunks from
        BPF_MAP_LOOKUP_BATCH: ``count`` keys and values laid end to end."""
        keys = ctypes.create_string_buffer(self.key_size * batch)
        vals = ctypes.create_string_buffer(self.value_size * batch)
        token_in: ctypes.Array[ctypes.c_char] | None = None
        token_out = ctypes.create_string_buffer(max(self.key_size, 8))
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        lib = libbpf().lib
        # A hash map's batch ends at a bucket's edge, so a batch may come
        # short of ``batch`` by a bucket's few entries: the bound allows half.
        for _ in range(self.max_entries // max(1, batch // 2) + 2):
            count = c_uint32(batch)
            ret = lib.bpf_map_lookup_batch(
                self.fd, token_in, token_out, keys, vals, ctypes.byref(count), ctypes.byref(opts)
            )
            if ret < 0 and ret != -2:
                _check(ret, f"batch lookup in {self.name}", MapError)
            n = count.value
            if n:
                # One copy out of each buffer per batch (.raw copies it whole).
                yield (ctypes.string_at(keys, n * self.key_size),
                       ctypes.string_at(vals, n * self.value_size), n)
            if ret == -2:
                return
            token_in = ctypes.create_string_buffer(token_out.raw, len(token_out))

    def items(self, batch: int = 1024) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value), read with BPF_MAP_LOOKUP_BATCH."""
        ks, vs = self.key_size, self.value_size
        for kb, vb, n in self.batches(batch):
            for i in range(n):
                yield kb[i * ks : (i + 1) * ks], vb[i * vs : (i + 1) * vs]

    def delete_batch(self, keys: list[bytes]) -> int:
        """Delete many keys at once; returns how many the kernel deleted.
        Two keys or fewer go one by one: a batch's buffers cost more than
        the syscall they save (8.6 us for a batch of one, 3.2 for a delete,
        0.5 a key in a batch of 100, measured here)."""
        if len(keys) <= 2:
            return sum(self.delete(k) for k in keys)
        return self._delete_packed(b"".join(keys), len(keys))

    def _delete_packed(self, packed: bytes, n: int) -> int:
        """Delete the ``n`` keys laid end to end in ``packed``."""
        buf = ctypes.create_string_buffer(packed, self.key_size * n)
        count = c_uint32(n)
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        ret = libbpf().lib.bpf_map_delete_batch(self.fd, buf, ctypes.byref(count), ctypes.byref(opts))
        if ret < 0:
            # A key missing (ENOENT: gone in between, e.g. an LRU eviction)
            # stops the batch there: finish one by one, that key included.
            ks = self.key_size
            return count.value + sum(self.delete(packed[i * ks : (i + 1) * ks])
                                     for i in range(count.value, n))
        return count.value

    def all_keys(self) -> list[bytes]:
        """Every key, read a batch at a time (keys() costs a syscall per key)."""
        ks = self.key_size
        return [kb[i * ks : (i + 1) * ks] for kb, _vb, n in self.batches() for i in range(n)]

    def clear(self) -> int:
        """Delete every entry, a batch read at a time: a list of every key
        was 10 MB of small objects at 100,000 flows, whose arenas stayed.
        Deleting what the walk has passed leaves its place (the batch
        token: the next bucket) valid."""
        return sum(self._delete_packed(kb, n) for kb, _vb, n in self.batches())


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    duration_ns: int


class Program:
    def __init__(self, name: str, fd: int):
        self.name = name
        self.fd = fd

    def test_run(self, data: bytes, ctx: bytes | None = None, repeat: int = 1) -> TestRun:
        """BPF_PROG_TEST_RUN: run the program on ``data`` and return what it did."""
        out = ctypes.create_string_buffer(len(data) + 512)
        din = ctypes.create_string_buffer(data, len(data))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts))
        opts.data_in = ctypes.cast(din, c_void_p)
        opts.data_size_in = len(data)
        opts.data_out = ctypes.cast(out, c_void_p)
        opts.data_size_out = len(out)
        opts.repeat = repeat
        cin = None
        if ctx is not None:
            cin = ctypes.create_string_buffer(ctx, len(ctx))
            opts.ctx_in = ctypes.cast(cin, c_void_p)
            opts.ctx_size_in = len(ctx)
        ret = libbpf().lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
        _check(ret, f"test run of {self.name}")
        return TestRun(opts.retval, out.raw[: opts.data_size_out], opts.duration)


class BpfObject:
    """An opened (and, after :meth:`load`, loaded) BPF object file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        lib = libbpf()
        lib.take_messages()
        ptr = lib.lib.bpf_object__open_file(self.path.encode(), None)
        if not ptr:
            err = ctypes.get_errno()
            raise ObjectLoadError(f"cannot open BPF object {self.path}", errno=err, log=lib.take_messages())
        self._obj: int | None = ptr

    def _map_ptr(self, name: str) -> int:
        ptr = libbpf().lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise MapError(f"no map {name!r} in {self.path}")
        return int(ptr)

    @property
    def _ptr(self) -> int:
        if self._obj is None:
            raise BpfError(f"{self.path} is closed")
        return self._obj

    def set_max_entries(self, name: str, entries: int) -> None:
        """Size a map; only before :meth:`load`."""
        _check(libbpf().lib.bpf_map__set_max_entries(self._map_ptr(name), entries),
               f"sizing map {name}", MapError)

    def set_pin_path(self, name: str, path: str) -> None:
        """Pin ``name`` at ``path`` on load, re-using a compatible pinned map there."""
        _check(libbpf().lib.bpf_map__set_pin_path(self._map_ptr(name), path.encode()),
               f"pin path of {name}", MapError)

    def load(self) -> None:
        """Load into the kernel; a verifier rejection carries the log."""
        lib = libbpf()
        lib.take_messages()
        ret = lib.lib.bpf_object__load(self._ptr)
        if ret < 0:
            raise ObjectLoadError(f"cannot load BPF object {self.path}", errno=-ret,
                                  log=lib.take_messages())

    def map(self, name: str) -> Map:
        ptr = self._map_ptr(name)
        lib = libbpf().lib
        fd = lib.bpf_map__fd(ptr)
        _check(fd, f"fd of map {name} (object not loaded?)", MapError)
        return Map(name, fd, lib.bpf_map__key_size(ptr), lib.bpf_map__value_size(ptr),
                   lib.bpf_map__max_entries(ptr))

    def program(self, name: str) -> Program:
        lib = libbpf().lib
        ptr = lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(f"no program {name!r} in {self.path}")
        fd = lib.bpf_program__fd(ptr)
        _check(fd, f"fd of program {name} (object not loaded?)")
        return Program(name, fd)

    def close(self) -> None:
        if self._obj is not None:
            libbpf().lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RING_LIMIT = -4095  # no errno: the callback's "enough for now"


class RingBuffer:
    """Consumer of a BPF ring buffer; ``fd`` is an epoll fd to poll for input."""

    def __init__(self, ring: Map, callback: Callable[[bytes], None]):
        self._callback = callback
        self._cb = _SAMPLE_FN(self._on_sample)
        lib = libbpf().lib
        ptr = lib.ring_buffer__new(ring.fd, self._cb, None, None)
        if not ptr:
            raise MapError(f"cannot open ring buffer {ring.name}", errno=ctypes.get_errno())
        self._rb: int | None = ptr
        self.fd = lib.ring_buffer__epoll_fd(ptr)
        self.error: BaseException | None = None
        self._left = 0  # records this consume may still take; <= 0: no limit

    def _on_sample(self, _ctx: int | None, data: int | None, size: int) -> int:
        try:
            self._callback(ctypes.string_at(data or 0, size))
        except Exception as exc:  # an exception must not cross into C
            self.error = exc
            return -1
        self._left -= 1
        # A negative return stops libbpf after this record (consumed) and is
        # handed back by ring_buffer__consume: the limit is reached.
        return _RING_LIMIT if self._left == 0 else 0

    def consume(self, limit: int = 0) -> int:
        """Hand queued records to the callback, at most ``limit`` of them
        (0: all, also those that arrive meanwhile); returns the count. The
        rest stay queued, the ring's fd readable."""
        if self._rb is None:
            return 0
        self._left = limit
        ret = libbpf().lib.ring_buffer__consume(self._rb)
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        if ret == _RING_LIMIT:
            return limit
        return _check(ret, "ring buffer consume", MapError)

    def close(self) -> None:
        if self._rb is not None:
            libbpf().lib.ring_buffer__free(self._rb)
            self._rb = None


def xdp_attach(ifindex: int, prog: Program, mode: str = "auto") -> str:
    """Attach XDP to ``ifindex``, replacing what is there; ``mode`` is
    ``auto`` (native, else generic), ``xdp`` (native only) or ``xdpgeneric``.
    Returns the mode that took."""
    lib = libbpf().lib
    tries = {"auto": ("xdp", "xdpgeneric"), "xdp": ("xdp",), "xdpgeneric": ("xdpgeneric",)}[mode]
    ret = 0
    for attempt in tries:
        flags = XDP_FLAGS_DRV_MODE if attempt == "xdp" else XDP_FLAGS_SKB_MODE
        ret = lib.bpf_xdp_attach(ifindex, prog.fd, flags, None)
        if ret == 0:
            return attempt
        log.debug("XDP %s attach to ifindex %d failed: %s", attempt, ifindex, os.strerror(-ret))
    raise AttachError(f"cannot attach XDP ({mode}) to ifindex {ifindex}", errno=-ret)


def xdp_detach(ifindex: int, mode: str) -> None:
    flags = XDP_FLAGS_DRV_MODE if mode == "xdp" else XDP_FLAGS_SKB_MODE
    ret = libbpf().lib.bpf_xdp_detach(ifindex, flags, None)
    if ret < 0 and ret != -19:  # ENODEV: the device is gone, and the program with it
        raise AttachError(f"cannot detach XDP from ifindex {ifindex}", errno=-ret)


def xdp_prog_id(ifindex: int, mode: str) -> int:
    """Id of the XDP program attached in ``mode``, 0 if none."""
    flags = XDP_FLAGS_DRV_MODE if mode == "xdp" else XDP_FLAGS_SKB_MODE
    pid = c_uint32(0)
    _check(libbpf().lib.bpf_xdp_query_id(ifindex, flags, ctypes.byref(pid)), "XDP query", AttachError)
    return pid.value


def _tc_hook(ifindex: int, egress: bool = False) -> _TcHook:
    return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex,
                   attach_point=BPF_TC_EGRESS if egress else BPF_TC_INGRESS)


TC_HANDLE = 0x0FF1
# Last in the ingress chain: the program ends classification for every packet
# (TC_ACT_OK or a redirect), so filters that sort after it never run. SQM's
# ifb redirect (sqm-scripts: `prio 10`) and filters added without a priority
# (tc numbers them from 49152 down) must come first, or SQM stops shaping
# downloads altogether (docs/openwrt.md, SQM and QoS).
TC_PRIORITY = 0xFF00


def tc_attach(ifindex: int, prog: Program, *, egress: bool = False) -> None:
    """Attach ``prog`` as a direct-action filter at clsact ingress (or
    egress; clsact created if missing), replacing our own previous filter."""
    lib = libbpf().lib
    hook = _tc_hook(ifindex, egress)
    ret = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if ret < 0 and ret != -17:  # EEXIST: clsact already there (SQM, another tool)
        raise AttachError(f"cannot create clsact on ifindex {ifindex}", errno=-ret)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog.fd, flags=1,  # BPF_TC_F_REPLACE
                   handle=TC_HANDLE, priority=TC_PRIORITY)
    _check(lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)),
           f"cannot attach TC filter to ifindex {ifindex}", AttachError)


def tc_detach(ifindex: int, *, egress: bool = False) -> None:
    """Remove our filter; the clsact qdisc stays (others may use it)."""
    hook = _tc_hook(ifindex, egress)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=TC_HANDLE, priority=TC_PRIORITY)
    ret = libbpf().lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
    if ret < 0 and ret not in (-2, -19, -22):  # already gone / device gone
        raise AttachError(f"cannot detach TC filter from ifindex {ifindex}", errno=-ret)


def tc_attached(ifindex: int) -> bool:
    hook = _tc_hook(ifindex)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=TC_HANDLE, priority=TC_PRIORITY)
    return int(libbpf().lib.bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))) == 0


def make_pin_dir(path: Path, top: Path | None = None) -> None:
    """Create ``path`` (and missing parents) root-only, 0700, and refuse it
    when a directory on the way could have been planted by someone else.

    The BPF filesystem may be world-writable (1777 on some hosts): a local
    user could create our directory first and fill it with maps of their
    own. Every directory from the filesystem's root (not checked: not ours)
    down to ``path`` must be root's, not a symlink, and writable by nobody
    else; one of root's with a looser mode (an older version's 0755) is
    tightened to 0700. ``top``: check from this directory down instead (tests)."""
    missing: list[Path] = []
    here = Path(os.path.abspath(path))
    while not os.path.lexists(here):
        missing.append(here)
        here = here.parent
    top = Path(os.path.abspath(top)) if top is not None else None
    ours: list[Path] = []
    while top not in missing and here != here.parent \
            and os.lstat(here.parent).st_dev == os.lstat(here).st_dev:
        ours.append(here)  # below the filesystem's root: one of our directories
        if here == top:
            break
        here = here.parent
    for d in reversed(ours):
        _private_dir(d)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass  # someone was quicker: judged below like any other
        _private_dir(d)


def _private_dir(d: Path) -> None:
    st = os.lstat(d)
    mode = st.st_mode & 0o7777
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or mode & 0o022:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise BpfError(f"pin directory {d} is {kind} owned by uid {st.st_uid} with mode "
                       f"{mode:04o}, not root's 0700; someone else may have created it: "
                       f"remove it and start again")
    if mode != 0o700:
        log.info("%s: mode %04o tightened to 0700", d, mode)
        os.chmod(d, 0o700)


def is_bpffs(path: Path) -> bool:
    """True when ``path`` is on a BPF filesystem (statfs magic)."""
    class _Statfs(Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_char * 120)]

    libc = libbpf().libc
    libc.statfs.argtypes = [c_char_p, c_void_p]
    libc.statfs.restype = c_int
    st = _Statfs()
    if libc.statfs(str(path).encode(), ctypes.byref(st)) != 0:
        return False
    return bool((st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)


__all__ = [
    "BPF_ANY", "BPF_EXIST", "BPF_NOEXIST", "BpfObject", "Map", "Program", "RingBuffer",
    "TestRun", "is_bpffs", "libbpf", "make_pin_dir", "tc_attach", "tc_attached", "tc_detach", "xdp_attach",
    "xdp_detach", "xdp_prog_id",
]
