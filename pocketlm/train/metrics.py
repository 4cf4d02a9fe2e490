"""What a run reports: bits per byte, MFU against a measured peak, metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


def measured_peak_flops(dtype: torch.dtype, device: torch.device) -> float:
    """Peak matmul FLOP/s at the training precision, measured once per machine and cached:
    MFU against a datasheet number means little on a shared CPU."""
    cache = Path.home() / ".cache" / "pocketlm" / "peak_flops.json"
    key = f"{device.type}:{torch.cuda.get_device_name() if device.type == 'cuda' else torch.get_num_threads()}:{dtype}"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key in known:
        return known[key]
    n = 4096 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout, resume) untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    reps, best = 10, float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    peak = 2 * n**3 / best
    known[key] = peak
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(known, indent=2))
    return peak


@torch.no_grad()
def evaluate_lm(model, batches, byte_lengths: torch.Tensor, autocast, max_batches=None) -> dict:
    """Mean next-token loss and bits per byte = summed loss (nats) / (ln 2 * UTF-8 bytes of the targets).
    Targets with no bytes (special tokens) count in neither sum."""
    model.eval()
    loss_sum, n_tokens, bpb_loss, n_bytes = 0.0, 0, 0.0, 0
    device = next(model.parameters()).device
    for x, y in batches(max_batches):
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100)
        valid = y.flatten() != -100
        loss_sum += losses[valid].sum().item()
        n_tokens += int(valid.sum())
        nb = byte_lengths[y.flatten().clamp(min=0)] * valid
        bpb_loss += (losses * (nb > 0)).sum().item()
        n_bytes += int(nb.sum())
    model.train()
    loss = loss_sum / max(n_tokens, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": bpb_loss / (math.log(2) * max(n_bytes, 1)),
            "val_tokens": n_tokens}


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.file = run_dir / "metrics.jsonl"
        self.plot_file = run_dir / "loss.png"
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.file, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume, forget what was logged after the checkpoint we go back to."""
        if self.enabled and self.file.exists():
            kept = [r for r in self.records() if r.get("step", 0) <= step]
            self.file.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def plot(self) -> None:
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = self.records()
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", alpha=0.7)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot_file.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(self.plot_file)
