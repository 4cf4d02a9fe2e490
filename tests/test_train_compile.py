"""train.compile=true through `pretrain` and `finetune` (tiny models, two steps): the step runs as a
compiled graph and follows the eager run's losses."""

import functools
import json

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import TINY
from pocketlm.cli import main
from test_finetune import FAST, base, keyword_data  # noqa: F401  (base is a fixture)


@pytest.fixture(params=["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def compile_backend(request, monkeypatch):
    """The loop's torch.compile with this backend. aot_eager traces the whole forward and backward
    (graph breaks, symbolic shapes, the custom autograd functions) in seconds; inductor, what runs for
    real, adds minutes of C++ builds on 2 shared cores."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=request.param))
    torch._dynamo.reset()
    counters.clear()
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs: two contending OpenMP threads only spin
    yield
    torch.set_num_threads(n)


def curve(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def compiled_and_eager(verb_args, tmp_path, compile_args):
    assert main([*verb_args, "--out", str(tmp_path / "compiled"), "--train.compile=true", *compile_args]) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert main([*verb_args, "--out", str(tmp_path / "eager")]) == 0
    assert len(curve(tmp_path / "eager")) == 2
    assert curve(tmp_path / "compiled") == pytest.approx(curve(tmp_path / "eager"), rel=1e-4)


def test_compiled_pretrain_matches_eager(data_dir, tmp_path, compile_backend):
    args = ["pretrain", "--data", str(data_dir), "--max-steps", "2", *TINY, "--train.dtype=fp32", "--train.eval_every=100"]
    compiled_and_eager(args, tmp_path, ["--train.compile_scope=model"])


# is_causal is now a plain bool (it broke the graph at every attention call); two breaks remain under
# symbolic lengths ("TypeError when making fake tensor call"), not yet found
GRAPH_BREAK = "compiled fine-tuning by length still breaks its graph twice (TypeError when making a fake tensor call)"


@pytest.mark.parametrize("pack", [pytest.param(True, id="packed"),
                                  pytest.param(False, id="by-length", marks=[pytest.mark.slow, pytest.mark.xfail(
                                      reason=GRAPH_BREAK, strict=True)])])
def test_compiled_finetune_matches_eager(base, tmp_path, compile_backend, pack):  # noqa: F811
    # per block, as the recipes run; unpacked batches vary in length and compile with symbolic shapes
    data = keyword_data(tmp_path / "train.jsonl", 40)
    args = ["finetune", "--model", str(base), "--data", str(data), "--max-steps", "2", "--lora", *FAST,
            "--train.eval_every=100", *(["--pack", "--train.seq_len=128"] if pack else [])]
    compiled_and_eager(args, tmp_path, ["--train.compile_scope=blocks"])
    if not pack:
        assert not counters["graph_break"], list(counters["graph_break"])
