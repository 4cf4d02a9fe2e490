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
