"""Builds pocketlm's C++ kernels (pocketlm/csrc: gemv.cpp for decoding, train_attention.cpp and train_kernels.cpp
for training) on first use.

torch.utils.cpp_extension compiles with the C++ compiler torch.compile also uses and caches the result
per machine (~/.cache/torch_extensions; ~10-25 s the first time). The kernels register `torch.ops.pocketlm.*`.
"""

from __future__ import annotations

import fcntl
import functools
import os
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
BASE_FLAGS = ["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"]
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16"]


@functools.cache
def cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def has(flag: str) -> bool:
    """Whether the CPU advertises a feature, e.g. has("amx_bf16")."""
    return f" {flag}" in cpu_flags()


def build(name: str, source: str | list[str], extra_cflags: list[str]) -> None:
    """Compiles and loads kernel sources from pocketlm/csrc as one library; raises where the toolchain cannot."""
    from torch.utils.cpp_extension import _get_build_directory, load
    try:  # torch runs `ninja` from PATH; the pip package's copy is not on it unless the venv is activated
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    sources = [source] if isinstance(source, str) else source
    build_dir = Path(_get_build_directory(name, verbose=False))  # (torch's own: per Python version, TORCH_EXTENSIONS_DIR)
    # torch guards a build with a plain `lock` file, which a build killed midway (Ctrl-C, a timeout) leaves
    # behind: every later process would then wait on it forever. An flock dies with its process, so
    # whoever holds ours knows no live pocketlm process is building here and clears a stale `lock`.
    with open(build_dir / "pocketlm.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        load(name, sources=[str(CSRC / s) for s in sources], extra_include_paths=[str(CSRC)], is_python_module=False,
             extra_cflags=BASE_FLAGS + extra_cflags, extra_ldflags=["-fopenmp"], build_directory=str(build_dir))


# glibc's malloc tunables (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep the memory torch frees for the next forward instead of handing it back to the
    kernel. A batched forward allocates activations of several MB each (a 1,024-token pack's gate/up
    output is 12 MB); by default glibc serves big blocks with fresh mmaps and trims the heap's top on
    free, so every forward touches new pages: hundreds of thousands of page faults a run (analyze's
    batched rows/s rose ~18% on 2 threads without them). With blocks up to 32 MB (glibc's ceiling) on the heap
    and the heap never trimmed, the process keeps its peak footprint instead, as an engine that
    preallocates would. glibc only (musl and macOS have no mallopt of this kind); POCKETLM_MALLOPT=0
    leaves the allocator as it is. Returns whether the settings were applied."""
    if os.environ.get("POCKETLM_MALLOPT", "1") == "0":
        return False
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False
