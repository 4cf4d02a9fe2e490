"""Shared fixtures: a small tokenizer and token shards from Tiny Shakespeare, built once per session."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "pocketlm" / "data" / "bundled" / "tinyshakespeare.txt"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shakespeare_small(tmp_path_factory) -> Path:
    """The first 200 kB of Tiny Shakespeare: enough for a tokenizer and a few training steps."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text()[:200_000])
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(shakespeare_small, tmp_path_factory) -> Path:
    from pocketlm.cli import main

    out = tmp_path_factory.mktemp("tok")
    assert main(["tokenizer", "train", "--input", str(shakespeare_small), "--vocab-size", "512",
                 "--val-fraction", "0.1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def data_dir(shakespeare_small, tokenizer_dir, tmp_path_factory) -> Path:
    from pocketlm.cli import main

    out = tmp_path_factory.mktemp("shards")
    assert main(["prepare", "--input", str(shakespeare_small), "--tokenizer", str(tokenizer_dir), "--out", str(out)]) == 0
    return out


TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--train.batch_size=4", "--train.seq_len=32",
        "--train.warmup_steps=2", "--train.lr=1e-2", "--train.eval_every=5", "--train.eval_batches=2", "--train.log_every=1"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread is several times faster than two contending ones on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
