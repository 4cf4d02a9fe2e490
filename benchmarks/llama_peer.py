"""llama.cpp (through llama-cpp-python, `pip install -e '.[bench]'`) as a benchmark peer: the same GGUF
file, the same threads, greedy. Decode is timed by differencing (N tokens minus 1 token, so prefill
cancels out), as decode_speed.py times pocketlm; prefill as one eval of the prompt; time to first
token from process start as the wall time of a whole process that loads the file and makes one token.
"""

from __future__ import annotations

import subprocess
import sys
import time


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load(path, threads: int, n_ctx: int = 2048):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                 verbose=False)


def _greedy(llm, prompt_ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):  # never stops on its own: EOS ignored
        out.append(token)
        if len(out) == n:
            break
    return out


def decode_rate(llm, prompt_ids: list[int], n: int) -> tuple[float, list[int]]:
    """Tokens/s of batch-1 greedy decoding, and the tokens (to compare with pocketlm's)."""
    t = time.perf_counter()
    tokens = _greedy(llm, prompt_ids, n)
    t_n = time.perf_counter() - t
    t = time.perf_counter()
    _greedy(llm, prompt_ids, 1)
    t_1 = time.perf_counter() - t
    return (n - 1) / (t_n - t_1), tokens


def prefill_rate(llm, prompt_ids: list[int]) -> float:
    """Prompt tokens/s of one eval from an empty cache."""
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids)
    return len(prompt_ids) / (time.perf_counter() - t)


def first_token_from_start(path, threads: int, prompt: str) -> float:
    """Seconds from starting a fresh Python process to its first generated token (process exit included)."""
    code = ("import sys; from llama_cpp import Llama; "
            f"llm = Llama(model_path={str(path)!r}, n_threads={threads}, n_ctx=2048, verbose=False); "
            f"llm.create_completion({prompt!r}, max_tokens=1, temperature=0)")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t
