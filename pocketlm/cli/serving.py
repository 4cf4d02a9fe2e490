"""generate / chat / serve: the engine behind stdout, a terminal and HTTP."""

from __future__ import annotations


def _generate(args):
    from pocketlm.infer.generate import generate_cli

    generate_cli(args)


def _chat(args):
    from pocketlm.infer.generate import chat_cli

    chat_cli(args)


def _serve(args):
    from pocketlm.serve.app import serve

    serve(args)


def _add_engine_args(sp, dtype: str):
    """How generate / chat / serve load and run the model."""
    sp.add_argument("--adapter", help="LoRA adapter folder (PEFT format, or a LoRA fine-tuning run) applied on top "
                                      "of --model; merged into the weights at load, so it costs nothing per token")
    sp.add_argument("--dtype", choices=("int8", "int4", "bf16", "fp32"), default=dtype,
                    help=f"weight precision (default {dtype}): int8 (one scale per row, bf16 activations) decodes one "
                         "stream fast on CPU; int4 (groups of 32, as GGUF Q4_1) faster still, and exact for Q4_1 "
                         "files but lossy for others; bf16 decodes many streams at once fastest; fp32 is exact. "
                         "Logits are fp32 in all. See benchmarks/decode_speed.py")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decode step (minutes to start, faster decode)")
    sp.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")


def _add_sampling_args(sp, max_new_tokens=200):
    _add_engine_args(sp, dtype="int8")  # one stream
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
    _add_sampling_args(ge)
    ge.set_defaults(func=_generate)

    ch = sub.add_parser("chat", help="talk to a model in the terminal (streaming; /reset, /system, /quit)")
    ch.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    ch.add_argument("--system", help="system prompt")
    _add_sampling_args(ch, max_new_tokens=512)
    ch.set_defaults(func=_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page at /")
    sv.add_argument("--model", required=True, help="run, checkpoint, Hugging Face folder or .gguf file")
    _add_engine_args(sv, dtype="bf16")  # batches of requests: bf16 has the higher throughput there (measured)
    sv.add_argument("--model-name", help="the id clients pass as `model` (default: the file or folder name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: $POCKETLM_API_KEY, else none)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache slots)")
    sv.add_argument("--max-seq-len", type=int, default=2048, help="positions per slot (prompt + reply)")
    sv.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    sv.set_defaults(func=_serve)
