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
    if not compile:  # which step one decoding stream takes, said once as the kernels are
        from pocketlm.infer import cstep
        why = cstep.why_not(engine.model, engine.cache)
        print("decode: one stream's step in one C++ call (decode_step.cpp)" if why is None else
              f"decode: one stream's step op by op ({why})", file=sys.stderr, flush=True)
    from pocketlm.model.vision import vision_tower
    engine.vision = vision_tower(source, model)  # a vision model's encoder and projector, else None
    from pocketlm.model.speech import speech_tower
    engine.speech = speech_tower(source, model)  # a speech model's audio encoder and projector, else None
    for tower in (engine.vision, engine.speech):
        if tower is not None:
            tower.lm = None  # only the tower is kept: the engine holds its own fused copy of the LM
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


def stream_to(engine: Engine, ids: list[int], params: SamplingParams, out: TextIO, input_embeds=None) -> str:
    """Print the reply as it is decoded; return it whole. Ctrl-C ends the reply early."""
    text = []
    events = engine.stream(ids, params, input_embeds=input_embeds)
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
             repetition_penalty: float = 1.0, seed: int | None = None, image=None, audio=None, documents=None,
             out: TextIO | None = None) -> str:
    """Continue `prompt` (or, with chat, answer it as a user message), streaming to `out` (stdout);
    returns the generated text. A plain prompt is the caller's own raw text: markers in it are
    special tokens, as in a training document. `image` (a file) needs a vision model and makes the
    prompt a chat: the image, then the prompt, as one user message; `audio` (a WAV file) likewise for a
    speech model. documents: a folder to answer
    from (grounded mode, pocketlm.safety.grounded; implies chat): the reply cites passages as [n],
    listed after it."""
    out = out or sys.stdout
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    if system and not (chat or image is not None or audio is not None or documents is not None):
        raise InputError("system needs chat (it is a chat message)")
    if image is not None and audio is not None:
        raise InputError("give an image or an audio file, not both")
    index = _index(documents)
    engine = load_engine(model, adapter=adapter, dtype=dtype, compile=compile, threads=threads)
    found, embeds = [], None
    if chat or index is not None or image is not None or audio is not None:
        user = (image_message(prompt) if image is not None else audio_message(prompt) if audio is not None
                else {"role": "user", "content": prompt})
        media, tower = ((image_pixels(engine, model, [image]), engine.vision) if image is not None else
                        (audio_mels(engine, model, [audio]), engine.speech) if audio is not None else (None, None))
        ids, embeds, found = _prompt(engine, ([{"role": "system", "content": system}] if system else []) + [user],
                                     index, media, tower)
    else:
        ids = encode_completion(engine.tokenizer, prompt, special=True)
        out.write(prompt)
    text = stream_to(engine, ids, params, out, input_embeds=embeds)
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


def image_message(text: str) -> dict:
    from pocketlm.model.vision import IMAGE_PLACEHOLDER

    return {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{text}"}


def image_pixels(engine: Engine, model, files: list) -> torch.Tensor:
    """The image files as the engine's vision tower takes them, (N, C, S, S)."""
    from pocketlm.data.images import decode_image
    from pocketlm.model.vision import prepare_images

    vision = getattr(engine, "vision", None)
    if vision is None:
        raise InputError(f"{model}: a text-only model; --image needs a vision model (a folder with vision.safetensors)")
    arrays = []
    for file in files:
        try:
            data = open(file, "rb").read()
        except OSError as e:
            raise InputError(f"{file}: cannot read the image ({e.strerror})") from None
        arrays.append(decode_image(data, str(file)))
    return torch.cat([prepare_images(a[None], vision.vision_cfg) for a in arrays])


def audio_message(text: str) -> dict:
    from pocketlm.model.speech import AUDIO_PLACEHOLDER

    return {"role": "user", "content": f"{AUDIO_PLACEHOLDER}\n{text}"}


def audio_mels(engine: Engine, model, files: list) -> torch.Tensor:
    """The WAV files as the engine's speech tower takes them, (N, n_mels, frames)."""
    from pocketlm.data.speech import read_wav_file
    from pocketlm.model.speech import prepare_clips

    speech = getattr(engine, "speech", None)
    if speech is None:
        raise InputError(f"{model}: no speech encoder; --audio needs a speech model (a folder with speech.safetensors)")
    waves = [read_wav_file(file) for file in files]
    try:
        return prepare_clips(waves, speech.speech_cfg)
    except InputError as e:
        raise InputError(f"{files[0]}: {e}") from None


HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /quit leaves"


def chat_repl(engine: Engine, params: SamplingParams, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO | None = None, index=None,
              pixels=None) -> list[dict]:
    """A terminal conversation: each turn is sent with the whole history; returns the history.
    index: grounded mode (pocketlm.safety.grounded.Index), each turn answered from its passages.
    pixels (one image, for a vision model): shown with the first message (again after /reset)."""
    out = out or sys.stdout
    history: list[dict] = []
    image_turn = None  # the user message that carries the image
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
        message = {"role": "user", "content": line}
        if pixels is not None and not any(m is image_turn for m in history):
            message = image_turn = image_message(line)
        history.append(message)
        try:
            ids, embeds, found = _fit_history(engine, system, history, params.max_tokens, index,
                                              pixels if image_turn is not None else None, image_turn)
        except InputError as e:  # e.g. a typed <image> beside the real one
            history.pop()
            out.write(f"({e})\n")
            continue
        if ids is None:
            history.pop()
            out.write(f"(that message alone does not fit the {engine.max_seq_len}-token context)\n")
            continue
        out.write("bot> ")
        reply = stream_to(engine, ids, params, out, input_embeds=embeds)
        out.write("\n")
        _cited_sources(reply, found, out)
        history.append({"role": "assistant", "content": reply})


def _fit_history(engine: Engine, system, history: list[dict], max_tokens: int, index=None, pixels=None,
                 image_turn=None):
    """(ids, input_embeds or None, the passages it was grounded in) for the conversation, dropping the
    oldest turns until it leaves room for a reply; (None, None, []) when the last message alone does
    not fit."""
    budget = engine.max_seq_len - min(max_tokens, engine.max_seq_len // 2)
    while history:
        ids, embeds, found = _prompt(engine, ([{"role": "system", "content": system}] if system else []) + history,
                                     index, pixels if any(m is image_turn for m in history) else None)
        if len(ids) <= budget:
            return ids, embeds, found
        if len(history) == 1:
            return None, None, []
        del history[:2]  # one user turn and its reply
    return None, None, []


def _prompt(engine: Engine, messages: list[dict], index=None, pixels=None, tower=None):
    """(ids, input_embeds or None, passages) of a chat: grounded in `index`'s passages if given, with the
    image `pixels` (or a speech tower's clips) spliced at its placeholder if given."""
    found = []
    if index is not None:
        from pocketlm.safety.grounded import grounded_messages
        messages, found = grounded_messages(messages, index)
    if pixels is not None:
        return (*(tower or engine.vision).engine_prompt(engine.tokenizer, messages, pixels), found)
    return encode_chat(engine.tokenizer, messages), None, found


def chat(model, *, system: str | None = None, adapter=None, dtype: str = "auto", compile: bool = False,
         threads: int | None = None, max_new_tokens: int = 512, temperature: float = 0.8, top_k: int = 0,
         top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
         documents=None, image=None) -> list[dict]:
    """A conversation in the terminal, about `image` (a file, for a vision model) if given, answered
    from the `documents` folder if given; returns its history."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    index = _index(documents)
    engine = load_engine(model, adapter=adapter, dtype=dtype, compile=compile, threads=threads)
    pixels = None if image is None else image_pixels(engine, model, [image])
    return chat_repl(engine, params, system=system, index=index, pixels=pixels)
