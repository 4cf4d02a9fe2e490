"""The vision-language stages, then accuracy through the chat path.

    stage 0  the encoder alone, with one linear classification head per image set on its mean-pooled
             patches (its accuracy is the encoder's own linear-probe figure)
    stage 1  alignment: the projector on templated captions ("This is a picture of the digit seven.")
    stage 2  the projector on question-answer chat rows ("What digit is this?" -> "7")

The encoder is frozen after stage 0, so its pixel-shuffled features are computed once and stages 1-2
train on them. Loss is on the assistant's tokens only. With `train_lm` (the from-scratch tiny LM,
which knows no text yet) the LM trains with the projector in stages 1-2; with a pretrained LM it stays
frozen. This is a small dedicated loop, not pocketlm/train/loop.py: that loop's batches are token ids
only, and these rows carry images. Each stage stops at its step count or its CPU-minute budget,
whichever comes first, with the learning-rate schedule stretched to the budget (as loop.py does).
The recipe that chains the stages is pocketlm/train/vlm_recipe.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.data import images as image_data
from pocketlm.infer.engine import Engine
from pocketlm.infer.sampling import SamplingParams
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.model.vision import IMAGE_PLACEHOLDER, VisionLM, encode_prompt
from pocketlm.tokenizer import Tokenizer

CAPTION_PROMPT = f"{IMAGE_PLACEHOLDER}\nDescribe the image."
QUESTION = f"{IMAGE_PLACEHOLDER}\nWhat digit is this?"


@dataclass(frozen=True)
class ImageTask:
    """What the chat asks about one image set and what counts as right: `answers[c]` is the reply
    trained for class c; a reply is right when it is one of `accepted[c]` (case and a final full stop
    aside), or starts with one followed by a space."""
    question: str
    answers: tuple[str, ...]
    captions: tuple[str, ...]
    accepted: tuple[tuple[str, ...], ...]

    def right(self, reply: str, label: int) -> bool:
        norm = reply.strip().lower().rstrip(".")
        return any(norm == w or norm.startswith(w + " ") for w in self.accepted[label])


TASKS = {
    "mnist": ImageTask(QUESTION, tuple(str(d) for d in range(10)),
                       tuple(f"This is a picture of the digit {w}." for w in image_data.DIGIT_WORDS),
                       tuple((str(d), w) for d, w in enumerate(image_data.DIGIT_WORDS))),
    "fashion": ImageTask(f"{IMAGE_PLACEHOLDER}\nWhat piece of clothing is this?", image_data.FASHION_WORDS,
                         tuple(f"This is a picture of a {w.lower()}." for w in image_data.FASHION_WORDS),
                         tuple((w.lower(),) for w in image_data.FASHION_WORDS)),
}


def caption(label: int) -> str:
    return TASKS["mnist"].captions[label]


def answer(label: int) -> str:
    return TASKS["mnist"].answers[label]


@dataclass
class ChatRows:
    """One prompt shared by every row (the image differs) and the answer per class: a batch is the
    prompt, then the answer and the end-of-turn token, scored on the answer part only."""
    prompt: list[int]
    answers: list[list[int]]

    @classmethod
    def build(cls, tokenizer: Tokenizer, user: str, replies, tokens_per_image: int,
              placeholder: str = IMAGE_PLACEHOLDER) -> "ChatRows":
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": user}], tokens_per_image, placeholder=placeholder)
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


def tiny_text_model(vocab_texts: list[str], seed: int = 0, n_embd: int = 64, n_layer: int = 2, n_head: int = 2,
                    vocab_size: int = 320) -> tuple[GPT, Tokenizer]:
    """pocketlm's own GPT from scratch, with a byte-level BPE trained on the rows' texts."""
    tok = Tokenizer.train(vocab_texts, vocab_size=vocab_size, min_frequency=1)
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=128, n_layer=n_layer,
                      n_head=n_head, n_embd=n_embd)
    return GPT(cfg), tok


def shift_augment(pixels: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Each image moved by up to max_shift pixels each way (zero borders: digits sit on black)."""
    if max_shift <= 0:
        return pixels
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


class Schedule:
    """Linear warmup then cosine decay over `steps`, or over `cpu_minutes` of this process's CPU
    time when that ends first (0: no budget): progress is whichever share is further along."""

    def __init__(self, steps: int, cpu_minutes: float = 0.0, warmup: int = 50):
        self.steps, self.budget, self.warmup = steps, cpu_minutes * 60, max(1, min(warmup, steps // 10))
        self.start = time.process_time()

    def progress(self, step: int) -> float:
        share = step / max(1, self.steps)
        if self.budget:
            share = max(share, (time.process_time() - self.start) / self.budget)
        return share

    def lr(self, step: int, peak: float) -> float:
        return peak * min(1.0, (step + 1) / self.warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, self.progress(step))))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def _run(params, schedule: Schedule, lr: float, weight_decay: float, loss_at, log, stage: str, every: int) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses, step = [], 0
    while not schedule.done(step):
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step, lr)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % every == 0:
            log(f"{stage} step {step}: loss {loss.item():.4f}")
        step += 1
    log(f"{stage}: {step} steps, last loss {losses[-1] if losses else float('nan'):.4f}")
    return losses


def train_encoder(vlm: VisionLM, sets, *, steps: int, cpu_minutes: float = 0.0, batch_size: int = 64,
                  lr: float = 2e-3, shift: int = 2, seed: int = 0, log=print) -> list[nn.Linear]:
    """Stage 0: the encoder and one linear head per (pixels, labels) set on its mean-pooled patches,
    cross-entropy on the labels. Every step encodes one batch of each set together: the stem's
    BatchNorm then normalizes with the mixture's statistics in training as in evaluation (sets
    taking turns, one a step, left the running statistics a blend no batch had: probes fell from
    97.8% to 85.3% on MNIST). Returns the heads."""
    heads = [nn.Linear(vlm.vision_cfg.width, int(labels.max()) + 1) for _, labels in sets]
    params = [*vlm.encoder.parameters(), *(p for h in heads for p in h.parameters())]
    g = torch.Generator().manual_seed(seed)

    def loss_at(step):
        picks = [torch.randint(0, len(pixels), (batch_size,), generator=g) for pixels, _ in sets]
        pooled = vlm.encode(shift_augment(torch.cat([p[i] for (p, _), i in zip(sets, picks)]), shift, g)).mean(1)
        return sum(F.cross_entropy(head(part), labels[i])
                   for head, part, (_, labels), i in zip(heads, pooled.split(batch_size), sets, picks))

    vlm.encoder.train()
    _run(params, Schedule(steps, cpu_minutes), lr, 0.05, loss_at, log, "stage 0", 100)
    vlm.encoder.eval()
    return heads


@torch.no_grad()
def probe_accuracy(vlm: VisionLM, head: nn.Linear, pixels, labels, chunk: int = 500) -> float:
    preds = torch.cat([head(vlm.encode(pixels[i:i + chunk]).mean(1)).argmax(-1) for i in range(0, len(pixels), chunk)])
    return (preds == labels).float().mean().item()


@torch.no_grad()
def encoder_features(vlm: VisionLM, pixels, chunk: int = 500) -> torch.Tensor:
    return torch.cat([vlm.features(pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)])


def train_chat(vlm: VisionLM, tasks, *, steps: int, train_lm: bool, cpu_minutes: float = 0.0, batch_size: int = 32,
               lr: float = 3e-3, seed: int = 0, stage: str = "stage", log=print) -> list[float]:
    """Stages 1-2: the projector (and the LM when train_lm) on chat rows, given precomputed features:
    tasks is a list of (rows, features, labels), taking turns one batch a step; rows.batch(labels of the
    sampled items) gives (ids with tokens_per_image holes (-1) a row, targets): ChatRows, or the
    scenes' QuestionRows."""
    params = [*vlm.projector.parameters(), *(vlm.lm.parameters() if train_lm else [])]
    for p in vlm.lm.parameters():
        p.requires_grad_(train_lm)
    g = torch.Generator().manual_seed(seed)

    def loss_at(step):
        rows, features, labels = tasks[step % len(tasks)]
        idx = torch.randint(0, len(features), (batch_size,), generator=g)
        ids, targets = rows.batch(labels[idx].tolist())
        embeds = torch.zeros(*ids.shape, vlm.lm.cfg.n_embd)
        embeds[ids < 0] = vlm.projector(features[idx]).flatten(0, 1)  # each row's holes, in order
        return vlm.lm(ids, targets, input_embeds=embeds)[1]

    vlm.lm.train()
    try:
        return _run(params, Schedule(steps, cpu_minutes, warmup=20), lr, 0.0, loss_at, log, stage, 50)
    finally:
        vlm.lm.eval()
        for p in vlm.lm.parameters():
            p.requires_grad_(True)


def chat_replies(vlm: VisionLM, tokenizer: Tokenizer, pixels, question: str = QUESTION, *, max_batch: int = 32,
                 chunk: int = 256, max_tokens: int = 4) -> list[str]:
    """Greedy replies through the Engine, the images (or a speech tower's clips) as input_embeds."""
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": question}], vlm.tokens_per_item,
                           placeholder=vlm.placeholder)
    engine = Engine(vlm.lm, tokenizer, max_batch=max_batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    replies: list[str] = []
    with torch.no_grad():
        for start in range(0, len(pixels), chunk):
            embeds = vlm.embeds(pixels[start:start + chunk])
            reqs = [engine.submit(prompt, params, input_embeds=e) for e in embeds]
            while engine.step():
                pass
            replies += [r.text for r in reqs]
    return replies


def chat_accuracy(vlm: VisionLM, tokenizer: Tokenizer, pixels, labels, task: ImageTask = TASKS["mnist"],
                  **kw) -> tuple[float, list[str]]:
    """(share of greedy replies that name the label, the replies)."""
    # room for the longest answer and a stop (a fixed 4 tokens cut "ankle boot" to "ankle b")
    kw.setdefault("max_tokens", max(len(tokenizer.encode(a)) for a in task.answers) + 1)
    replies = chat_replies(vlm, tokenizer, pixels, task.question, **kw)
    right = [task.right(reply, int(label)) for reply, label in zip(replies, labels.tolist())]
    return sum(right) / max(1, len(right)), replies
