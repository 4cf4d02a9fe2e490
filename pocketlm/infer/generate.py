"""`pocketlm generate` and `pocketlm chat`: the engine behind a terminal.

    pocketlm generate --model runs/shakespeare --prompt "ROMEO:" --max-new-tokens 100
    pocketlm chat --model SmolLM2-135M-Instruct.Q4_1.gguf --system "You are terse."
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

import torch

from pocketlm.infer.engine import Engine
from pocketlm.infer.fused import PRECISIONS
from pocketlm.infer.sampling import SamplingParams
from pocketlm.tokenizer import Tokenizer
from pocketlm.errors import InputError


# dtype "auto": a GGUF file's own block type where a kernel holds it exactly, else group-wise int8
FAITHFUL = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8g"}
DTYPES = ("auto", *PRECISIONS)


def faithful_precision(model, adapter=None) -> str:
    """The precision "auto" picks for a loaded model: int4 for Q4_0/Q4_1 GGUF weights (the file's own
    blocks), group-wise int8 (Q8_0's layout) for Q8_0 files and for everything else (full-precision
    checkpoints, other block types, or weights an adapter was merged into)."""
    quant = None if adapter else getattr(model, "source_quant", None)
    return FAITHFUL.get(quant, "int8g")


def load_engine(source, *, adapter=None, dtype: str = "auto", max_batch: int = 1, max_seq_len: int | None = None,
                compile: bool = False, threads: int | None = None) -> Engine:
    """An Engine over a run, checkpoint, Hugging Face folder or .gguf file, with an optional LoRA
    adapter (PEFT format) folded into the weights, so it costs nothing per token. Prints the kernels
    it chose (one line, stderr)."""
    from pocketlm.infer.linears import describe
    from pocketlm.model.lora import load_model_with_adapter

    if dtype not in DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model_with_adapter(source, adapter)
    if tokenizer is None:
        raise InputError(f"{source}: has no tokenizer.json beside the weights; the engine needs one to read prompts")
    if dtype == "auto":
        dtype = faithful_precision(model, adapter)
    source_quant = None if adapter else getattr(model, "source_quant", None)
    print(describe(dtype, source_quant if FAITHFUL.get(source_quant) == dtype else None),
          file=sys.stderr, flush=True)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, precision=dtype, compile=compile)
    del model  # the engine holds its own fused copy of the weights
    if compile:
        print("compiling the decode step (a minute or more on a small CPU)...", file=sys.stderr, flush=True)
        engine.warmup()
    return engine


def encode_completion(tokenizer: Tokenizer, text: str, *, special: bool = False) -> list[int]:
    """Token ids of a plain-text prompt. Like training documents it starts with BOS, unless the
    tokenizer's config says otherwise (many Hugging Face models add none). Special-token markers in
    the text stay text unless `special` (trusted callers who write raw prompts)."""
    return tokenizer.encode(text, add_bos=bool(tokenizer.config.get("add_bos_token", True)), special=special)


def encode_chat(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the model's chat template, ending where the assistant speaks;
    contents are text (a marker typed in a message cannot open another turn)."""
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def stream_to(engine: Engine, ids: list[int], params: SamplingParams, out: TextIO) -> str:
    """Print the reply as it is decoded; return it whole. Ctrl-C ends the reply early."""
    text = []
    events = engine.stream(ids, params)
    try:
        for event in events:
            out.write(event.text)
            out.flush()
            text.append(event.text)
    except KeyboardInterrupt:
        events.close()  # cancels the request
        out.write(" [stopped]")
    return "".join(text)


def generate(model, prompt: str = "", *, chat: bool = False, system: str | None = None, adapter=None,
             dtype: str = "auto", compile: bool = False, threads: int | None = None, max_new_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, out: TextIO | None = None,
             documents=None) -> str:
    """Continue `prompt` (or, with chat, answer it as a user message), streaming to `out` (stdout);
    returns the generated text. A plain prompt is the caller's own raw text: markers in it are
    special tokens, as in a training document. documents: a folder to answer from (grounded mode,
    pocketlm.safety.grounded; implies chat): the reply cites passages as [n], listed after it."""
    out = out or sys.stdout
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    if system and not chat and documents is None:
        raise InputError("system needs chat (it is a chat message)")
    index = _index(documents)
    engine = load_engine(model, adapter=adapter, dtype=dtype, compile=compile, threads=threads)
    found = []
    if chat or index is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if index is not None:
            from pocketlm.safety.grounded import grounded_messages
            messages, found = grounded_messages(messages, index)
        ids = encode_chat(engine.tokenizer, messages)
    else:
        ids = encode_completion(engine.tokenizer, prompt, special=True)
        out.write(prompt)
    text = stream_to(engine, ids, params, out)
    out.write("\n")
    _cited_sources(text, found, out)
    return text


def _index(documents):
    """The BM25 index of a --documents folder, or None."""
    if documents is None:
        return None
    from pocketlm.safety.grounded import Index, load_documents

    return Index(load_documents(documents))


def _cited_sources(reply: str, found: list, out: TextIO) -> None:
    """Under a grounded reply, where each passage it cites comes from."""
    from pocketlm.safety.grounded import cited

    for n in cited(reply):
        if 1 <= n <= len(found):
            text = found[n - 1].text
            out.write(f"  [{n}] {found[n - 1].source}: {text[:80]}{'...' if len(text) > 80 else ''}\n")


HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /quit leaves"


def chat_repl(engine: Engine, params: SamplingParams, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO | None = None, index=None) -> list[dict]:
    """A terminal conversation: each turn is sent with the whole history; returns the history.
    index: grounded mode (pocketlm.safety.grounded.Index), each turn answered from its passages."""
    out = out or sys.stdout
    history: list[dict] = []
    out.write(f"chatting with a {engine.model.n_params / 1e6:.0f}M-parameter model. {HELP}\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return history
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return history
        if cmd == "/reset":
            history.clear()
            out.write("(conversation cleared)\n")
            continue
        if cmd == "/system":
            system = rest.strip() or None
            out.write(f"(system prompt {'set' if system else 'cleared'})\n")
            continue
        if cmd.startswith("/"):
            out.write(f"unknown command {cmd}; {HELP}\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids, found = _fit_history(engine, system, history, params.max_tokens, index)
        if ids is None:
            history.pop()
            out.write(f"(that message alone does not fit the {engine.max_seq_len}-token context)\n")
            continue
        out.write("bot> ")
        reply = stream_to(engine, ids, params, out)
        out.write("\n")
        _cited_sources(reply, found, out)
        history.append({"role": "assistant", "content": reply})


def _fit_history(engine: Engine, system, history: list[dict], max_tokens: int, index=None):
    """(the prompt for the conversation, the passages it was grounded in), dropping the oldest turns
    until it leaves room for a reply; (None, []) when the last message alone does not fit."""
    budget = engine.max_seq_len - min(max_tokens, engine.max_seq_len // 2)
    while history:
        messages, found = ([{"role": "system", "content": system}] if system else []) + history, []
        if index is not None:
            from pocketlm.safety.grounded import grounded_messages
            messages, found = grounded_messages(messages, index)
        ids = encode_chat(engine.tokenizer, messages)
        if len(ids) <= budget:
            return ids, found
        if len(history) == 1:
            return None, []
        del history[:2]  # one user turn and its reply
    return None, []


def chat(model, *, system: str | None = None, adapter=None, dtype: str = "auto", compile: bool = False,
         threads: int | None = None, max_new_tokens: int = 512, temperature: float = 0.8, top_k: int = 0,
         top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
         documents=None) -> list[dict]:
    """A conversation in the terminal; returns its history. documents: a folder to answer from."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    index = _index(documents)
    engine = load_engine(model, adapter=adapter, dtype=dtype, compile=compile, threads=threads)
    return chat_repl(engine, params, system=system, index=index)
