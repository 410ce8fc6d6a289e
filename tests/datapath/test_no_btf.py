"""The datapath loads on kernels without BTF (stock OpenWrt images have none:
``KERNEL_DEBUG_INFO_BTF`` is off by default).

What a kernel without BTF breaks, and how each is checked here:

- CO-RE relocations (``preserve_access_index``, ``bpf_core_*``): libbpf needs
  the kernel's BTF to resolve them. Checked statically (the object's
  ``.BTF.ext`` has no ``core_relo`` records) and by loading with the kernel's
  BTF hidden from libbpf.
- Extern symbols (``__ksym`` kfuncs and kernel variables, ``__kconfig``): kfunc
  calls need the kernel's BTF. Checked statically: the object has no undefined
  symbols at all.
- Helpers whose prototype carries a kernel BTF type id (``bpf_skc_to_*``,
  ``bpf_get_current_task_btf``, ``bpf_d_path`` ...): the verifier refuses them
  without the kernel's BTF. Checked statically against an allowlist of the
  helpers the datapath calls, none of which has a BTF id in its prototype.

What cannot be simulated here: the running kernel has BTF, and its verifier
would use it; no kernel without BTF can be booted on this machine (Debian's 6.1
kernel of the lane has BTF too). The load test hides the kernel's BTF from
libbpf (a tmpfs over /sys/kernel/btf in a private mount namespace), which is
exactly what libbpf finds on an OpenWrt router; the static checks cover the
verifier's side. The object's own BTF (map and function types) needs only
``BPF_BTF_LOAD``, which every kernel with ``CONFIG_BPF_SYSCALL`` has.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

SHT_SYMTAB = 2
SHF_EXECINSTR = 0x4
SHN_UNDEF = 0
BTF_MAGIC = 0xEB9F
BPF_JMP_CALL = 0x85  # BPF_JMP | BPF_CALL
HELPER_DEFS = Path("/usr/include/bpf/bpf_helper_defs.h")  # libbpf-dev

# Every helper the datapath may call. None takes or returns a kernel BTF type
# (no arg*_btf_id / ret_btf_id in its bpf_func_proto in the kernel), so each
# works without the kernel's BTF. A new helper in bpf/ fails the test until it
# is checked against the kernel's prototype and added here.
HELPERS_WITHOUT_BTF = frozenset({
    "bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_delete_elem", "bpf_ktime_get_ns",
    "bpf_l3_csum_replace", "bpf_l4_csum_replace", "bpf_csum_diff", "bpf_redirect",
    "bpf_redirect_map", "bpf_skb_vlan_push", "bpf_skb_vlan_pop", "bpf_skb_pull_data",
    "bpf_skb_change_head", "bpf_skb_adjust_room", "bpf_xdp_adjust_head", "bpf_skb_store_bytes",
    "bpf_skb_load_bytes", "bpf_ringbuf_reserve", "bpf_ringbuf_submit", "bpf_ringbuf_discard",
    "bpf_ringbuf_output", "bpf_get_smp_processor_id", "bpf_fib_lookup",
})

# A program with one CO-RE relocation: libbpf must find the kernel's BTF to
# decide whether the type exists.
CORE_PROBE = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
struct task_struct { int pid; } __attribute__((preserve_access_index));
SEC("xdp")
int core_probe(struct xdp_md *ctx)
{
	return bpf_core_type_exists(struct task_struct) ? XDP_PASS : XDP_DROP;
}
char LICENSE[] SEC("license") = "GPL";
"""

# A program each static check must refuse: a kfunc extern and a helper whose
# prototype returns a kernel BTF type. Only compiled, never loaded.
BTF_USER = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
extern int bpf_dynptr_from_xdp(struct xdp_md *xdp, __u64 flags, void *ptr) __ksym;
SEC("xdp")
int btf_user(struct xdp_md *ctx)
{
	char dynptr[16];
	if (bpf_dynptr_from_xdp(ctx, 0, dynptr))
		return XDP_PASS;
	return bpf_skc_to_tcp_sock(0) ? XDP_PASS : XDP_DROP;
}
char LICENSE[] SEC("license") = "GPL";
"""


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    flags: int
    data: bytes


def elf_sections(path: Path) -> list[Section]:
    """Sections of a little-endian ELF64 file (what clang -target bpf writes on x86)."""
    raw = path.read_bytes()
    assert raw[:4] == b"\x7fELF" and raw[4] == 2 and raw[5] == 1, f"{path}: not ELF64 LE"
    (shoff,) = struct.unpack_from("<Q", raw, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", raw, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", raw, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = raw[strtab[4]:strtab[4] + strtab[5]]

    def name(off: int) -> str:
        return names[off:names.index(b"\0", off)].decode()

    return [Section(name(h[0]), h[1], h[2], raw[h[4]:h[4] + h[5]]) for h in headers]


def section(path: Path, name: str) -> Section:
    found = [s for s in elf_sections(path) if s.name == name]
    assert found, f"{path} has no {name} section"
    return found[0]


def core_relocations(path: Path) -> list[tuple[int, int]]:
    """(instruction offset, relocation kind) of every CO-RE record in .BTF.ext
    (struct btf_ext_header and the core_relo info of libbpf's btf.h/libbpf_internal.h)."""
    ext = section(path, ".BTF.ext").data
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", ext, 0)
    assert magic == BTF_MAGIC, f".BTF.ext magic {magic:#x}"
    if hdr_len < 32:  # written before CO-RE existed: no core_relo fields
        return []
    core_off, core_len = struct.unpack_from("<II", ext, 24)
    if core_len == 0:
        return []
    info = ext[hdr_len + core_off:hdr_len + core_off + core_len]
    (rec_size,) = struct.unpack_from("<I", info, 0)
    relos, pos = [], 4
    while pos < len(info):
        _sec_name_off, num = struct.unpack_from("<II", info, pos)
        pos += 8
        for _ in range(num):
            insn_off, _type_id, _access, kind = struct.unpack_from("<IIII", info, pos)
            relos.append((insn_off, kind))
            pos += rec_size
    return relos


def undefined_symbols(path: Path) -> list[str]:
    """Named undefined symbols: externs that libbpf resolves against the kernel."""
    sections = elf_sections(path)
    symtab = next(s for s in sections if s.type == SHT_SYMTAB)
    strtab = next(s for s in sections if s.name == ".strtab").data
    out = []
    for off in range(0, len(symtab.data), 24):
        st_name, _info, _other, shndx = struct.unpack_from("<IBBH", symtab.data, off)
        name = strtab[st_name:strtab.index(b"\0", st_name)].decode()
        if shndx == SHN_UNDEF and name:
            out.append(name)
    return out


def helper_names() -> dict[int, str]:
    text = HELPER_DEFS.read_text()
    return {int(num): name for name, num in
            re.findall(r"\(\s*\*\s*(?:const\s+)?(bpf_\w+)\)\s*\(.*?\)\s*=\s*\(void \*\)\s*(\d+);",
                       text)}


def helpers_called(path: Path) -> set[str]:
    """Names of the helpers that the object's programs call (BPF_CALL with
    src_reg 0; 1 is a call to a BPF function, 2 a kfunc)."""
    names = helper_names()
    called = set()
    for sec in elf_sections(path):
        if not sec.flags & SHF_EXECINSTR:
            continue
        for off in range(0, len(sec.data), 8):
            code, regs, _off, imm = struct.unpack_from("<BBhi", sec.data, off)
            if code == BPF_JMP_CALL and regs >> 4 == 0:
                called.add(names.get(imm, f"helper #{imm}"))
    return called


def compile_probe(d: Path, name: str, source: str) -> Path:
    src, obj = d / f"{name}.bpf.c", d / f"{name}.bpf.o"
    src.write_text(source)
    arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c", str(src),
                    "-o", str(obj)], check=True)
    return obj


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory, bpf_object: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("btf")
    return {"core": compile_probe(d, "core", CORE_PROBE),
            "btf_user": compile_probe(d, "btf_user", BTF_USER)}


def test_no_core_relocations(bpf_object: Path, probes: dict[str, Path]) -> None:
    assert core_relocations(bpf_object) == []
    # the reader does see one where there is one (BPF_CORE_TYPE_EXISTS is kind 8)
    assert [kind for _, kind in core_relocations(probes["core"])] == [8]


def test_no_extern_symbols(bpf_object: Path, probes: dict[str, Path]) -> None:
    assert undefined_symbols(bpf_object) == []
    assert "bpf_dynptr_from_xdp" in undefined_symbols(probes["btf_user"])


def test_only_helpers_that_need_no_kernel_btf(bpf_object: Path, probes: dict[str, Path]) -> None:
    called = helpers_called(bpf_object)
    assert {"bpf_redirect", "bpf_ringbuf_reserve"} <= called  # the decoder reads real calls
    assert called <= HELPERS_WITHOUT_BTF, called - HELPERS_WITHOUT_BTF
    assert "bpf_skc_to_tcp_sock" in helpers_called(probes["btf_user"]) - HELPERS_WITHOUT_BTF


# Run in a private mount namespace where /sys/kernel/btf is an empty tmpfs:
# libbpf then finds no kernel BTF, as on a stock OpenWrt kernel.
LOADER = r"""
import os, sys
from offloader.bpfobj import BpfObject
from offloader.errors import ObjectLoadError
assert not os.path.exists("/sys/kernel/btf/vmlinux")
obj = BpfObject(sys.argv[1])
try:
    obj.load()
    print("loaded")
except ObjectLoadError as exc:
    print(f"refused: {exc}\n{exc.log}")
    sys.exit(1)
finally:
    obj.close()
"""


def load_without_kernel_btf(obj: Path) -> subprocess.CompletedProcess[str]:
    # libbpf also looks for a vmlinux image in these places; none may exist,
    # or the simulation would not hide the kernel's BTF.
    release = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    for fallback in (f"/boot/vmlinux-{release}", f"/lib/modules/{release}/vmlinux-{release}",
                     f"/lib/modules/{release}/build/vmlinux",
                     f"/usr/lib/modules/{release}/kernel/vmlinux",
                     f"/usr/lib/debug/boot/vmlinux-{release}",
                     f"/usr/lib/debug/boot/vmlinux-{release}.debug",
                     f"/usr/lib/debug/lib/modules/{release}/vmlinux"):
        assert not Path(fallback).exists(), f"{fallback} would give libbpf the kernel's BTF"
    assert shutil.which("unshare"), "unshare (util-linux) missing"
    script = 'mount -t tmpfs none /sys/kernel/btf && exec "$0" -c "$1" "$2"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           sys.executable, LOADER, str(obj)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "PYTHONPATH": ":".join(sys.path)})


def test_loads_with_kernel_btf_hidden(bpf_object: Path, probes: dict[str, Path]) -> None:
    assert Path("/sys/kernel/btf/vmlinux").exists()  # the host still has it afterwards
    ours = load_without_kernel_btf(bpf_object)
    assert ours.returncode == 0 and "loaded" in ours.stdout, ours.stdout + ours.stderr
    # the simulation bites: a program with a CO-RE relocation is refused
    core = load_without_kernel_btf(probes["core"])
    assert core.returncode == 1, core.stdout + core.stderr
    assert "failed to find valid kernel BTF" in core.stdout, core.stdout
    assert Path("/sys/kernel/btf/vmlinux").exists()
