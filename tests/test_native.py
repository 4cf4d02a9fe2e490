"""Building the C++ kernels (pocketlm/native.py): a build killed midway must not hang later runs."""

import torch.utils.cpp_extension as cpp_extension

from pocketlm import native


def test_a_stale_torch_lock_left_by_a_killed_build_is_cleared(tmp_path, monkeypatch):
    """torch's `lock` file outlives a killed build and made every later process wait forever (seen here
    after a timed-out server); build() clears it under an flock that dies with its holder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "pocketlm_probe" / "lock"
    stale.parent.mkdir()
    stale.touch()
    seen = {}

    def fake_load(name, **kw):  # stands in for the compiler: what matters is what it finds on disk
        seen["lock_present"] = stale.exists()
        seen["build_directory"] = kw["build_directory"]

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    native.build("pocketlm_probe", "gemv.cpp", [])
    assert seen == {"lock_present": False, "build_directory": str(stale.parent)}
