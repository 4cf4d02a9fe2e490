"""The vision-language recipe on digits: three short stages, then accuracy through the chat path.

    stage 0  the encoder alone, with a linear classification head on its mean-pooled patches
             (its accuracy on the test set is the encoder's own linear-probe figure)
    stage 1  alignment: the projector on templated captions ("This is a picture of the digit seven.")
    stage 2  the projector on question-answer chat rows ("What digit is this?" -> "7")

The encoder is frozen after stage 0, so its pixel-shuffled features are computed once and stages 1-2
train on them. Loss is on the assistant's tokens only. With `train_lm` (the from-scratch tiny LM,
which knows no text yet) the LM trains with the projector in stages 1-2; with a pretrained LM it stays
frozen. This is a small dedicated loop, not pocketlm/train/loop.py: that loop's batches are token ids
only, and these rows carry images.

    result = train_vlm("runs/vlm", stage0_steps=600, stage1_steps=150, stage2_steps=150)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.data import images as image_data
from pocketlm.infer.engine import Engine
from pocketlm.infer.sampling import SamplingParams
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.model.vision import IMAGE_PLACEHOLDER, VisionConfig, VisionLM, encode_prompt, prepare_images
from pocketlm.tokenizer import Tokenizer

CAPTION_PROMPT = f"{IMAGE_PLACEHOLDER}\nDescribe the image."
QUESTION = f"{IMAGE_PLACEHOLDER}\nWhat digit is this?"


def caption(label: int) -> str:
    return f"This is a picture of the digit {image_data.DIGIT_WORDS[label]}."


def answer(label: int) -> str:
    return str(label)


@dataclass
class ChatRows:
    """One prompt shared by every row (the image differs) and the answer per class: a batch is the
    prompt, then the answer and the end-of-turn token, scored on the answer part only."""
    prompt: list[int]
    answers: list[list[int]]

    @classmethod
    def build(cls, tokenizer: Tokenizer, user: str, replies: list[str], tokens_per_image: int) -> "ChatRows":
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": user}], tokens_per_image)
        end = tokenizer.eos_id
        return cls(prompt, [tokenizer.encode(r, special=False) + [end] for r in replies])

    def batch(self, labels) -> tuple[torch.Tensor, torch.Tensor]:
        width = len(self.prompt) + max(len(a) for a in self.answers)
        ids = torch.zeros(len(labels), width, dtype=torch.long)
        targets = torch.full((len(labels), width), -100, dtype=torch.long)
        n = len(self.prompt)
        for row, label in enumerate(labels):
            a = self.answers[int(label)]
            ids[row, :n + len(a)] = torch.tensor(self.prompt + a)
            targets[row, n - 1:n - 1 + len(a)] = torch.tensor(a)  # position t predicts token t+1
        return ids, targets


def tiny_text_model(vocab_texts: list[str], seed: int = 0, n_embd: int = 64) -> tuple[GPT, Tokenizer]:
    """pocketlm's own GPT from scratch, with a byte-level BPE trained on the rows' texts."""
    tok = Tokenizer.train(vocab_texts, vocab_size=320, min_frequency=1)
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=n_embd)
    return GPT(cfg), tok


def shift_augment(pixels: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Each image moved by up to max_shift pixels each way (zero borders: digits sit on black)."""
    if max_shift <= 0:
        return pixels
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_encoder(vlm: VisionLM, pixels, labels, *, steps: int, batch_size: int = 64, lr: float = 2e-3,
                  shift: int = 2, seed: int = 0, log=print) -> nn.Linear:
    """Stage 0: the encoder and a linear head on its mean-pooled patches, cross-entropy on the labels."""
    head = nn.Linear(vlm.vision_cfg.width, int(labels.max()) + 1)
    params = [*vlm.encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    vlm.encoder.train()
    for step in range(steps):
        for group in opt.param_groups:  # linear warmup, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / max(1, min(50, steps // 10))) * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(pixels), (batch_size,), generator=g)
        x = shift_augment(pixels[idx], shift, g)
        loss = F.cross_entropy(head(vlm.encoder((x - 0.5) / 0.5).mean(1)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"stage 0 step {step}: loss {loss.item():.4f}")
    vlm.encoder.eval()
    return head


@torch.no_grad()
def probe_accuracy(vlm: VisionLM, head: nn.Linear, pixels, labels, chunk: int = 500) -> float:
    preds = torch.cat([head(vlm.encoder((pixels[i:i + chunk] - 0.5) / 0.5).mean(1)).argmax(-1)
                       for i in range(0, len(pixels), chunk)])
    return (preds == labels).float().mean().item()


@torch.no_grad()
def encoder_features(vlm: VisionLM, pixels, chunk: int = 500) -> torch.Tensor:
    return torch.cat([vlm.features(pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)])


def train_chat(vlm: VisionLM, rows: ChatRows, features, labels, *, steps: int, train_lm: bool,
               batch_size: int = 32, lr: float = 3e-3, seed: int = 0, stage: str = "stage", log=print) -> list[float]:
    """Stages 1-2: the projector (and the LM when train_lm) on chat rows, given precomputed features."""
    params = [*vlm.projector.parameters(), *(vlm.lm.parameters() if train_lm else [])]
    for p in vlm.lm.parameters():
        p.requires_grad_(train_lm)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    vlm.lm.train()
    holes = torch.tensor(rows.prompt) < 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, min(20, steps // 10))) * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(features), (batch_size,), generator=g)
        ids, targets = rows.batch(labels[idx].tolist())
        embeds = torch.zeros(*ids.shape, vlm.lm.cfg.n_embd)
        embeds[:, :len(rows.prompt)][:, holes] = vlm.projector(features[idx])
        _, loss = vlm.lm(ids, targets, input_embeds=embeds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"{stage} step {step}: loss {loss.item():.4f}")
    vlm.lm.eval()
    for p in vlm.lm.parameters():
        p.requires_grad_(True)
    return losses


def chat_accuracy(vlm: VisionLM, tokenizer: Tokenizer, pixels, labels, *, question: str = QUESTION,
                  max_batch: int = 32, chunk: int = 256) -> tuple[float, list[str]]:
    """Greedy replies through the Engine with the images as input_embeds; a reply is right when its
    first word is the label's digit or its word. Returns (accuracy, replies)."""
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": question}], vlm.tokens_per_image)
    engine = Engine(vlm.lm, tokenizer, max_batch=max_batch)
    params = SamplingParams(max_tokens=4, temperature=0)
    replies: list[str] = []
    with torch.no_grad():
        for start in range(0, len(pixels), chunk):
            embeds = vlm.image_embeds(pixels[start:start + chunk])
            reqs = [engine.submit(prompt, params, input_embeds=e) for e in embeds]
            while engine.step():
                pass
            replies += [r.text for r in reqs]
    right = [_matches(reply, int(label)) for reply, label in zip(replies, labels.tolist())]
    return sum(right) / len(right), replies


def _matches(reply: str, label: int) -> bool:
    words = reply.strip().lower().rstrip(".").split()
    return bool(words) and words[0] in (str(label), image_data.DIGIT_WORDS[label])


def train_vlm(out, *, stage0_steps: int = 600, stage1_steps: int = 150, stage2_steps: int = 150,
              vision: VisionConfig | None = None, eval_limit: int | None = None, seed: int = 0,
              threads: int | None = None, data_root=None, log=print) -> dict:
    """Every stage on MNIST's 5k training digits (10% held out for validation) with a tiny LM trained
    from scratch; saves the model to `out` and returns the accuracies on the MNIST test set (the
    first eval_limit images, or all 10,000) with the seconds and CPU-seconds each part took."""
    if threads:
        torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    timings = {}

    def mark(name):
        timings[name] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}

    cfg = vision or VisionConfig()
    (train_x, train_y), (val_x, val_y) = image_data.split(*image_data.load_mnist_train_5k(data_root), 0.1, seed)
    test_x, test_y = image_data.load_mnist_test(data_root)
    if eval_limit:
        test_x, test_y = test_x[:eval_limit], test_y[:eval_limit]
    to_pixels = lambda x: prepare_images(x, cfg)  # noqa: E731
    train_p, val_p, test_p = to_pixels(train_x), to_pixels(val_x), to_pixels(test_x)
    train_t, val_t, test_t = (torch.as_tensor(y) for y in (train_y, val_y, test_y))

    texts = [caption(d) for d in range(10)] + [answer(d) for d in range(10)] + [CAPTION_PROMPT, QUESTION]
    lm, tok = tiny_text_model(texts * 20, seed)
    vlm = VisionLM(lm, cfg)
    log(f"vision encoder {sum(p.numel() for p in vlm.encoder.parameters()):,} params, projector "
        f"{sum(p.numel() for p in vlm.projector.parameters()):,}, LM {sum(p.numel() for p in lm.parameters()):,}")

    head = train_encoder(vlm, train_p, train_t, steps=stage0_steps, seed=seed, log=log)
    mark("stage0")
    result = {"probe_val": probe_accuracy(vlm, head, val_p, val_t), "probe_test": probe_accuracy(vlm, head, test_p, test_t)}
    log(f"stage 0: linear-probe accuracy val {result['probe_val']:.4f}, test {result['probe_test']:.4f}")
    feats = encoder_features(vlm, train_p)
    captions = ChatRows.build(tok, CAPTION_PROMPT, [caption(d) for d in range(10)], vlm.tokens_per_image)
    questions = ChatRows.build(tok, QUESTION, [answer(d) for d in range(10)], vlm.tokens_per_image)
    result["stage1_loss"] = train_chat(vlm, captions, feats, train_t, steps=stage1_steps, train_lm=True,
                                       seed=seed, stage="stage 1", log=log)[-1]
    mark("stage1")
    result["stage2_loss"] = train_chat(vlm, questions, feats, train_t, steps=stage2_steps, train_lm=True,
                                       seed=seed + 1, stage="stage 2", log=log)[-1]
    mark("stage2")
    vlm.save(Path(out), tok)  # before the evaluation: a killed evaluation keeps the trained model
    result["chat_val"], _ = chat_accuracy(vlm, tok, val_p, val_t)
    result["chat_test"], replies = chat_accuracy(vlm, tok, test_p, test_t)
    result["test_images"] = len(test_t)
    result["sample_replies"] = replies[:5]
    mark("eval")
    log(f"chat-path accuracy val {result['chat_val']:.4f}, MNIST test ({len(test_t)}) {result['chat_test']:.4f}")
    result["timings"] = timings
    (Path(out) / "results.json").write_text(json.dumps(result, indent=2))
    return result
