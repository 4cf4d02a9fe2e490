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


# ---- llama.cpp's multimodal library (libmtmd): the image embeddings an mmproj file gives ----------------
_QUIET = None  # the no-op log callback, kept alive for as long as the library may call it


def mtmd_available() -> bool:
    try:
        from llama_cpp import mtmd_cpp  # noqa: F401  (loads libmtmd.so: absent from some wheels)
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def mtmd_image_embeds(mmproj, lm_gguf, images, tokens: int | None, threads: int = 2) -> list:
    """llama.cpp's image embeddings (numpy (n_tokens, n_embd), one per uint8 (H, W, 3) image) from the
    mmproj file loaded beside the LM's GGUF, as llama-mtmd-cli computes them. tokens sets
    image_min_tokens = image_max_tokens (None: the projector type's defaults)."""
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import mtmd_cpp as M

    global _QUIET
    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_QUIET, None)
        M.mtmd_log_set(_QUIET, None)
        M.mtmd_helper_log_set(_QUIET, None)
    llama_cpp.llama_backend_init()
    lm = llama_cpp.llama_model_load_from_file(str(lm_gguf).encode(), llama_cpp.llama_model_default_params())
    if not lm:
        raise RuntimeError(f"llama.cpp could not load {lm_gguf}")
    params = M.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup = False, threads, False
    if tokens is not None:
        params.image_min_tokens = params.image_max_tokens = tokens
    ctx = M.mtmd_init_from_file(str(mmproj).encode(), lm, params)
    if not ctx:
        llama_cpp.llama_model_free(lm)
        raise RuntimeError(f"libmtmd could not load {mmproj} beside {lm_gguf}")
    n_embd = llama_cpp.llama_model_n_embd(lm)
    marker = M.mtmd_get_marker(ctx)
    out = []
    try:
        for image in images:
            image = np.ascontiguousarray(image, dtype=np.uint8)
            h, w = image.shape[:2]
            bitmap = M.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes()))
            chunks = M.mtmd_input_chunks_init()
            text = M.mtmd_input_text()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            try:
                if M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
                    raise RuntimeError("mtmd_tokenize failed")
                parts = []  # several image chunks where llama.cpp tiles the image
                for i in range(M.mtmd_input_chunks_size(chunks)):
                    chunk = M.mtmd_input_chunks_get(chunks, i)
                    if M.mtmd_input_chunk_get_type(chunk) != M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                        continue  # the text around the image (lfm2's <|image_start|>, <|image_end|>)
                    n = M.mtmd_input_chunk_get_n_tokens(chunk)
                    if M.mtmd_encode_chunk(ctx, chunk):
                        raise RuntimeError("mtmd_encode_chunk failed")
                    embd = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * n_embd,))
                    parts.append(embd.reshape(n, n_embd).copy())
                out.append(np.concatenate(parts))
            finally:
                M.mtmd_input_chunks_free(chunks)
                M.mtmd_bitmap_free(bitmap)
    finally:
        M.mtmd_free(ctx)
        llama_cpp.llama_model_free(lm)
    return out
