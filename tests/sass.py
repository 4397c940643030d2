"""Reading compiled GPU code without a GPU: what ptxas and cuobjdump say about csrc/cuda's kernels.

The CUDA kernels promise 16-byte global accesses on their vector path (csrc/cuda/common.cuh Pack)
and everything per thread in registers. The emulator (tests/cuda_emu) checks the access widths of
the host compiler's code for the same source; nvcc's code can differ (it split a 16-byte store into
four 4-byte ones where GCC kept one), so these helpers read the SASS that ptxas produced for sm_90:

    accesses = global_accesses(sass_text)                  # {mangled kernel: [Access, ...]}
    split_pack_accesses(kernel, accesses[kernel])           # narrow accesses inside one pack
    local_memory_kernels(ptxas_verbose_log)                 # kernels with a stack frame or spills
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Vector-path instantiations: kernel<T, W, ...> with T = float / __half / __nv_bfloat16, as mangled.
_INSTANCE = re.compile(r"(?P<kernel>[A-Za-z_]\w*?)I(?P<type>f|6__half|13__nv_bfloat16)Li(?P<w>\d+)E")
_ELEMENT_BYTES = {"f": 4, "6__half": 2, "13__nv_bfloat16": 2}
_ACCESS = re.compile(r"\b(?P<op>LDG|STG)\.E(?P<mods>(?:\.[A-Z0-9_]+)*)\s[^;]*?\[(?P<base>R\d+|RZ)(?:\.64)?"
                     r"(?P<offset>[+-]0x[0-9a-f]+)?\]")
_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclass(frozen=True)
class Access:
    op: str      # "LDG" or "STG"
    bytes: int   # width of the one access
    base: str    # address register
    offset: int  # immediate offset from it


def cuobjdump() -> Path | None:
    """The cuobjdump that ships in the triton wheel (the toolkit's nvcc here comes without one)."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


def global_accesses(sass: str) -> dict[str, list[Access]]:
    """Global loads and stores of each kernel in `cuobjdump -sass` output, by mangled name."""
    out: dict[str, list[Access]] = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = block.partition("\n")
        found = []
        for m in _ACCESS.finditer(body):
            mods = m.group("mods").strip(".").split(".")
            width = next((_WIDTHS[x] for x in mods if x in _WIDTHS), 4)
            found.append(Access(m.group("op"), width, m.group("base"), int(m.group("offset") or "0", 16)))
        out[name.strip()] = found
    return out


def pack_bytes(kernel: str) -> int | None:
    """Bytes of one pack of a vector-path instantiation (W elements of T, at most 16); None for the
    scalar path (W == 1) and for kernels that are not element-templated."""
    m = _INSTANCE.search(kernel)
    if not m or int(m.group("w")) == 1:
        return None
    return min(16, int(m.group("w")) * _ELEMENT_BYTES[m.group("type")])


def split_pack_accesses(kernel: str, accesses: list[Access]) -> list[Access]:
    """Accesses that give a pack away as split: narrower than the pack and at a nonzero offset below
    it from their address register (the pieces of one pack land at +4, +8, +12 or +2, ...)."""
    pack = pack_bytes(kernel)
    if pack is None:
        return []
    return [a for a in accesses if a.bytes < pack and 0 < a.offset < pack]


def local_memory_kernels(ptxas_log: str) -> list[str]:
    """Kernels whose `ptxas -v` report shows local memory: a stack frame (a per-thread array indexed
    at run time, or spills) or spill stores / loads. Local memory is device memory: a kernel that
    uses it in its inner loop is no longer bandwidth-bound on its inputs alone."""
    found = []
    for m in re.finditer(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", ptxas_log):
        if int(m.group(2)) or int(m.group(3)) or int(m.group(4)):
            found.append(m.group(1))
    return found
