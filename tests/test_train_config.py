"""One config system: pre-training and fine-tuning sections parsed by pocketlm.config with the same
typed validation, through the CLI and the library."""

import pytest

from pocketlm.cli import main
from pocketlm.config import ConfigError, FinetuneConfig, load_config, load_finetune_config
from pocketlm.errors import PocketLMError


@pytest.mark.parametrize("override,match", [
    ("--finetune.pack=ture", "finetune.pack: expected bool, got 'ture'"),
    ("--finetune.lora_rank=eight", "finetune.lora_rank: expected int, got 'eight'"),
    ("--finetune.val_fraction=lots", "finetune.val_fraction: expected float, got 'lots'"),
    ("--finetune.lora_rnk=3", "unknown finetune keys ['lora_rnk']; valid keys: group_by_length, instruction, labels"),
    ("--train.compile=yes please", "train.compile: expected bool"),
    ("--train.dist=zero3", "train.dist: expected one of ('auto', 'ddp', 'fsdp')"),
    ("--model.dropout=high", "model.dropout: expected float"),
    ("--model.dropout=1.5", "model.dropout: expected a value in [0, 1)"),
    ("--lora_rnk=3", "unknown config key 'lora_rnk'; valid keys:"),
])
def test_finetune_overrides_are_typed_and_named(tmp_path, capsys, override, match):
    # the config is read before the model, so a bad key fails in milliseconds, whatever --model is
    args = ["finetune", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")]
    assert main([*args, override]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_finetune_yaml_is_validated_like_pretrain(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  pack: ture\n")
    with pytest.raises(ConfigError, match="finetune.pack: expected bool, got 'ture'"):
        load_finetune_config(bad)
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_finetune_config(bad)
    bad.write_text("finetune: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'finetune': expected key: value pairs"):
        load_finetune_config(bad)
    with pytest.raises(ConfigError, match="expected top-level sections 'model', 'train'"):
        load_config(bad)  # pre-training has no finetune section


def test_finetune_config_layers_defaults_file_overrides_and_flags(tmp_path):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("model:\n  dropout: 0.1\ntrain:\n  batch_size: 4\nfinetune:\n  lora: true\n  pack: false\n  labels: '0=no,1=yes'\n")
    run = load_finetune_config(cfg, {"finetune.pack": "true", "seed": "7", "lora_rank": "4", "dropout": "0.2"},
                               flags={"lora_alpha": 8, "system": None})
    assert run.finetune == FinetuneConfig(lora=True, pack=True, labels="0=no,1=yes", lora_rank=4, lora_alpha=8.0)
    assert isinstance(run.finetune.lora_alpha, float)
    # fine-tuning's own train defaults, LoRA's lr, the file's batch size, the bare override's seed
    assert (run.train.batch_size, run.train.seed, run.train.lr, run.train.seq_len) == (4, 7, 5e-4, 1024)
    assert run.dropout == 0.2
    assert load_finetune_config(None, {"finetune.system": "none"}).finetune.system is None


def test_config_errors_are_pocketlm_errors():
    with pytest.raises(PocketLMError):
        load_config(None, {"train.grad_accum": "0"})
    with pytest.raises(PocketLMError, match="unknown config section 'optim'"):
        load_config(None, {"optim.lr": "1"})


def test_the_demo_config_documents_every_key():
    """configs/demo.yaml lists every model and train key with a comment on its line (vocab_size, which
    pretrain takes from the data, in a comment of its own)."""
    import dataclasses
    import re
    from pathlib import Path

    from pocketlm.config import TrainConfig
    from pocketlm.model import ModelConfig

    lines = (Path(__file__).parents[1] / "configs" / "demo.yaml").read_text().splitlines()
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            documented = [ln for ln in lines if re.match(rf"\s+{f.name}: \S.*#\s*\S", ln) or re.match(rf"\s+# {f.name} ", ln)]
            assert documented, f"configs/demo.yaml: {section}.{f.name} missing or without a comment"


@pytest.mark.parametrize("world,micro,accum", [(1, 4, 4), (2, 4, 2), (4, 4, 1), (8, 2, 1), (16, 1, 1)])
def test_global_batch_derives_micro_batch_and_accumulation_from_the_world_size(world, micro, accum):
    cfg = load_config(None, {"train.global_batch": "16", "train.batch_size": "4"}).train.for_world(world)
    assert (cfg.batch_size, cfg.grad_accum) == (micro, accum) and micro * accum * world == 16
    assert cfg.for_world(world) == cfg  # derived once: the loop may derive again


def test_global_batch_errors_name_the_field():
    cfg = load_config(None, {"train.global_batch": "12"}).train
    with pytest.raises(ConfigError, match=r"train.global_batch: 12 sequences do not split evenly over 8 ranks"):
        cfg.for_world(8)
    with pytest.raises(ConfigError, match="train.grad_accum: derived from train.global_batch"):
        load_config(None, {"train.global_batch": "12", "train.grad_accum": "2"}).train.for_world(2)
    with pytest.raises(ConfigError, match="train.global_batch: expected 0"):
        load_config(None, {"train.global_batch": "-8"})
    plain = load_config(None, {"train.batch_size": "4", "train.grad_accum": "2"}).train
    assert plain.for_world(4) is plain  # without global_batch the step's batch grows with the ranks, as before
