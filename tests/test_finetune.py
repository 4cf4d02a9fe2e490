"""`pocketlm finetune` end to end on tiny models: learning, LoRA adapters on disk, exact resume
(LoRA checkpoints hold only the adapter), packing, early stopping with the best adapter kept, full
fine-tuning, config errors."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pocketlm.cli import main
from pocketlm.model import GPT, ModelConfig, load_model, save_checkpoint
from pocketlm.model.lora import lora_modules
from pocketlm.tokenizer import Tokenizer

FAST = ["--train.batch_size=8", "--train.seq_len=64", "--train.log_every=1", "--train.dtype=fp32", "--train.warmup_steps=1"]


@pytest.fixture(scope="module")
def base(tokenizer_dir, tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer.load(tokenizer_dir)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=48, block_size=128))
    path = tmp_path_factory.mktemp("base") / "tiny"
    save_checkpoint(path, model, tok)
    return path


def keyword_data(path, n, seed=0, flip=False):
    """The label is told by one word of the text: learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = rng.random() < 0.5
        word = rng.choice(["sweet", "fair", "gentle"] if good else ["foul", "vile", "base"])
        label = "pos" if good != flip else "neg"
        rows.append({"text": word, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finetune(*args):
    assert main(["finetune", *map(str, args)]) == 0


def test_full_finetune_learns_a_classification_task_and_eval_reads_its_task(base, tmp_path, capsys):
    train, dev = keyword_data(tmp_path / "train.jsonl", 200), keyword_data(tmp_path / "dev.jsonl", 40, seed=1)
    run = tmp_path / "run"
    finetune("--model", base, "--data", train, "--val-data", dev, "--out", run, "--max-steps", 100,
             "--labels", "neg=no,pos=yes", "--train.lr=1e-2", "--train.batch_size=16", "--train.eval_every=40",
             "--train.eval_at_start=true", *FAST)
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--task", "classification", "--data", str(dev), "--dtype", "fp32"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["task_spec"]["labels"] == {"neg": "no", "pos": "yes"}  # from run/task.json
    assert r["likelihood"]["accuracy"] >= 0.9
    assert r["generation"]["accuracy"] >= 0.9
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    assert val[0][0] == 0 and val[-1][1] < val[0][1] and (run / "loss.png").exists()  # eval_at_start: the "before"
    result = json.loads((run / "results.json").read_text())
    assert result["initial_val_loss"] == val[0][1] and result["val_loss"] == val[-1][1]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_lora_run_writes_a_peft_adapter_and_resumes_exactly(base, tmp_path, pack):
    train = keyword_data(tmp_path / "train.jsonl", 60 if not pack else 150)
    # lora dropout: the resumed run must restore the RNG as well as the adapter, optimizer and data
    common = ["--model", base, "--data", train, "--lora", "--lora-rank", 4, "--lora-dropout", 0.1, "--max-steps", 6,
              "--train.ckpt_every=3", "--train.keep_checkpoints=5", "--train.eval_every=100", *FAST,
              *(["--pack", "--train.seq_len=128"] if pack else [])]  # packed: 2 examples of ~50 tokens a row
    finetune(*common, "--out", tmp_path / "straight")
    finetune(*common, "--out", tmp_path / "resumed")
    # checkpoints hold the adapter and the training state, not the (frozen) base weights
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000003"
    assert {"adapter_config.json", "adapter_model.safetensors", "optim.pt", "state.json"} <= {p.name for p in ckpt.iterdir()}
    assert not list((tmp_path / "resumed").rglob("model.safetensors"))
    # as if killed after step 3: resume from that checkpoint
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000006")
    finetune(*common, "--out", tmp_path / "resumed", "--resume")
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for run in ("straight", "resumed")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it trained
    cfg = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    assert (tmp_path / "straight" / "adapter" / "task.json").exists()
    # and a model card beside the adapter, in Hugging Face's format, with the run's training figures
    hub = pytest.importorskip("huggingface_hub")
    readme = hub.ModelCard.load(tmp_path / "straight" / "adapter" / "README.md")
    assert readme.data.library_name == "peft" and readme.data.base_model == str(base)
    assert readme.data.datasets == ["train.jsonl"] and "- step: 6" in readme.text
    # the base weights did not move: only the adapters were trained
    model, _ = load_model(base)
    from pocketlm.model.lora import apply_adapter
    adapted = apply_adapter(model, tmp_path / "straight", merge=False)
    assert len(lora_modules(adapted)) == 2 * 7


def test_early_stopping_keeps_the_best_adapter(base, tmp_path):
    # validation labels are the opposite of training's: the better the fit, the worse validation gets
    train = keyword_data(tmp_path / "train.jsonl", 120)
    val = keyword_data(tmp_path / "val.jsonl", 24, seed=5, flip=True)
    run = tmp_path / "run"
    finetune("--model", base, "--data", train, "--val-data", val, "--out", run, "--lora", "--max-steps", 200,
             "--train.lr=1e-2", "--train.eval_every=3", "--train.early_stopping_patience=2", *FAST)
    result = json.loads((run / "results.json").read_text())
    assert "early stopping" in result["stop_reason"] and result["step"] < 200
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert result["best_val_loss"] == pytest.approx(min(val_losses))
    best = load_file(str(run / "checkpoints" / "best" / "adapter_model.safetensors"))
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_dropout_override_and_config_errors(base, tmp_path, capsys):
    train = keyword_data(tmp_path / "train.jsonl", 40)
    run = tmp_path / "run"
    finetune("--model", base, "--data", train, "--out", run, "--max-steps", 2, "--model.dropout=0.2", *FAST)
    assert json.loads((run / "config.json").read_text())["dropout"] == 0.2
    args = ["finetune", "--model", str(base), "--data", str(train), "--out", str(tmp_path / "x")]
    assert main(args + ["--model.n_layer=3"]) == 2
    assert "only model.dropout applies" in capsys.readouterr().err
    assert main(args + ["--finetune.lora_rnk=3"]) == 2
    assert "unknown finetune keys ['lora_rnk']" in capsys.readouterr().err
    assert main(args + ["--lora", "--lora-targets", "q_proj,wq"]) == 2
    assert "lora target 'wq'" in capsys.readouterr().err


def test_a_lora_checkpoint_resumes_only_as_the_lora_run_it_was(base, tmp_path, capsys):
    train = keyword_data(tmp_path / "train.jsonl", 40)
    run = tmp_path / "run"
    common = ["--model", base, "--data", train, "--out", run, *FAST]
    finetune(*common, "--lora", "--lora-rank", 4, "--max-steps", 2)
    capsys.readouterr()
    assert main(["finetune", *map(str, common), "--max-steps", "4", "--resume"]) == 2
    assert "resume it as a LoRA run (--lora)" in capsys.readouterr().err
    assert main(["finetune", *map(str, common), "--lora", "--lora-rank", "8", "--max-steps", "4", "--resume"]) == 2
    assert "(rank 4, scaling 4) does not fit this model's (rank 8, scaling 2)" in capsys.readouterr().err
    assert main(["generate", "--model", str(run), "--prompt", "x"]) == 2
    assert f"--model BASE --adapter {run}" in capsys.readouterr().err


def test_the_loop_passes_packed_rows_to_the_model_and_counts_only_real_tokens(base, tmp_path):
    """The first logged loss of packed rows is the unpacked loss of the same examples (so doc_ids
    reached the model), and the run's token count is the real tokens, not rows x seq_len."""
    from pocketlm.config import load_config
    from pocketlm.data.sft import encode_examples, load_examples
    from pocketlm.data.sft_batches import pack_batch, pack_rows, pad_batch
    from pocketlm.train.loop import train

    model, tok = load_model(base)
    enc, _ = encode_examples(tok, load_examples(keyword_data(tmp_path / "d.jsonl", 24))[0], 129)
    rows = pack_rows([len(ids) - 1 for ids, _ in enc], 128)
    batch = pack_batch([[enc[i] for i in row] for row in rows], pad_id=0)
    assert len(rows) < len(enc)
    with torch.no_grad():
        _, unpacked = model(*pad_batch(enc, pad_id=0))

    class SameBatch:
        def next_batch(self):
            return batch

        def state_dict(self):
            return {}

    cfg = load_config(None, {"train.max_steps": 2, "train.dtype": "fp32", "train.log_every": 1, "train.seq_len": 128,
                             "train.batch_size": len(rows)}).train
    result = train(model, tok, cfg, SameBatch(), None, tmp_path / "run")
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(unpacked.item(), abs=1e-5)
    assert result["tokens"] == 2 * batch[3] < 2 * len(rows) * 128


def test_a_bf16_lora_recipe_trains_where_the_cpu_lacks_bf16(base, tmp_path):
    # the loop falls back to fp32 there; the frozen weights must then stay fp32 too (they were cast to
    # bf16 ahead of the loop, and the first matmul failed on mixed dtypes)
    train = keyword_data(tmp_path / "train.jsonl", 16)
    finetune("--model", base, "--data", train, "--out", tmp_path / "run", "--lora", "--max-steps", 1,
             *[f for f in FAST if "dtype" not in f], "--train.dtype=bf16")
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
