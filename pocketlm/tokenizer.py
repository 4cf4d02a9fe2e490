"""Tokenizer: byte-level BPE trained and run by Hugging Face `tokenizers`, plus the chat template.

A tokenizer directory holds `tokenizer.json` (the HF tokenizers file) and `tokenizer_config.json`
(bos/eos tokens and the Jinja chat template), the same two files a Hugging Face model folder has,
so our own tokenizers and imported ones are one class.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from pocketlm.errors import PocketLMError

# GPT-4's pre-tokenization split (letters, 1-3 digit groups, punctuation runs, whitespace runs)
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS = "<|endoftext|>"  # also the document boundary between documents in a token stream
SPECIAL_TOKENS = [BOS, "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TokenizerError(PocketLMError):
    pass


def _token_text(tok) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, hf: HFTokenizer, config: dict | None = None):
        self.hf = hf
        self.config = dict(config or {})
        self._template = None
        self._text_hf: HFTokenizer | None = None
        self._markers: tuple[str, ...] | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        """Train byte-level BPE on an iterable of strings."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
        hf = HFTokenizer(models.BPE(byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        config = {"bos_token": BOS, "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
                  "chat_template": CHATML_TEMPLATE, "model_max_length": 1 << 30,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        return cls(hf, config)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise TokenizerError(f"{file}: no tokenizer.json found (train one with `pocketlm tokenizer train`)")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from e
        config = {}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from e
        return cls(hf, config)

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False), encoding="utf-8")

    # ---- encode / decode ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return _token_text(self.config.get("bos_token"))

    @property
    def eos_token(self) -> str | None:
        return _token_text(self.config.get("eos_token"))

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token) if self.eos_token else None

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a reply: eos plus the end-of-turn/document tokens the vocabulary has."""
        ids = {self.eos_id}
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
            ids.add(self.token_id(tok))
        return sorted(i for i in ids if i is not None)

    def encode(self, text: str, add_bos: bool = False, *, special: bool = True) -> list[int]:
        """special=True: a marker such as `<|im_end|>` written in `text` becomes that special token,
        which is right only for trusted text (a rendered template, a training document).
        special=False: the text is all text, markers included (what users and clients send)."""
        ids = _ids(self.hf if special else self.text_hf, text)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    @property
    def text_hf(self) -> HFTokenizer:
        """A copy of the HF tokenizer that encodes special-token markers as plain text (a copy, not a
        toggle of `hf.encode_special_tokens`, so threads tokenizing at once cannot race on it)."""
        if self._text_hf is None:
            copy = HFTokenizer.from_str(self.hf.to_str())
            copy.encode_special_tokens = True
            self._text_hf = copy
        return self._text_hf

    @property
    def markers(self) -> tuple[str, ...]:
        """The added tokens' strings (special markers): what message contents must not turn into."""
        if self._markers is None:
            self._markers = tuple(t.content for t in self.hf.get_added_tokens_decoder().values())
        return self._markers

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token stands for (0 for special tokens): the denominator of bits-per-byte."""
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        byte_level = "ByteLevel" in str(self.hf.decoder)
        out = [0] * self.vocab_size
        for piece, i in self.hf.get_vocab(with_added_tokens=True).items():
            if piece in special or i >= len(out):
                continue
            # in a byte-level vocabulary every character of a token is one byte
            out[i] = len(piece) if byte_level else len(self.decode([i]).encode("utf-8"))
        return out

    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer JSON: data shards record it to catch a tokenizer mismatch."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    # ---- chat ---------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        return self.config.get("chat_template") or CHATML_TEMPLATE

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render messages with the model's Jinja template in a sandbox (templates ship with
        downloaded models, so they are untrusted code)."""
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TokenizerError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r}")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the chat template: the template's markers are special
        tokens, the messages' contents are text (a `<|im_start|>` a user typed stays characters, so
        one message cannot forge another turn)."""
        return self._encode_chat(messages, add_generation_prompt, offsets=False)[1]

    def encode_chat_with_offsets(self, messages: list[dict], add_generation_prompt: bool = True
                                 ) -> tuple[str, list[int], list[tuple[int, int]]]:
        """The rendered conversation, its token ids, and each token's character span in the text."""
        return self._encode_chat(messages, add_generation_prompt, offsets=True)

    def _encode_chat(self, messages, add_generation_prompt, offsets: bool):
        text = self.apply_chat_template(messages, add_generation_prompt)
        if not any(marker in m["content"] for m in messages for marker in self.markers):
            pieces = [(0, len(text), self.hf)]  # nothing to keep apart: one pass
        else:
            pieces, at = [], 0
            for start, end in [*self._content_spans(messages, add_generation_prompt, text), (len(text), len(text))]:
                pieces += [(at, start, self.hf), (start, end, self.text_hf)]  # template, then content
                at = end
        ids, spans = [], []
        for a, b, hf in pieces:
            if b <= a:
                continue
            if offsets:
                enc = hf.encode(text[a:b], add_special_tokens=False)
                ids += enc.ids
                spans += [(a + s, a + e) for s, e in enc.offsets]
            else:
                ids += _ids(hf, text[a:b])
        return text, ids, spans

    def _content_spans(self, messages: list[dict], add_generation_prompt: bool, text: str) -> list[tuple[int, int]]:
        """Where the contents sit in `text`: render again with each content between two sentinels
        no content holds, and read their positions. A template that trims contents is handled by
        trimming first; one that rewrites them otherwise cannot be kept apart and is refused."""
        nonce = secrets.token_hex(8)
        open_, close = f"\x02{nonce}<", f">{nonce}\x03"
        for prepare in (lambda c: c, str.strip):
            marked = [{**m, "content": f"{open_}{prepare(m['content'])}{close}" if m["content"] else ""}
                      for m in messages]
            rendered = self.apply_chat_template(marked, add_generation_prompt)
            spans, plain, at = [], [], 0
            while (i := rendered.find(open_, at)) >= 0:
                j = rendered.find(close, i)
                if j < 0:
                    break
                plain.append(rendered[at:i])
                start = sum(map(len, plain))
                plain.append(rendered[i + len(open_):j])
                spans.append((start, start + j - i - len(open_)))
                at = j + len(close)
            plain.append(rendered[at:])
            if "".join(plain) == text and nonce not in text:
                return spans
        raise TokenizerError("the chat template changes message contents as it renders them, so they cannot be "
                             "kept apart from its own markers; refusing messages that contain special tokens")


def _ids(hf: HFTokenizer, text: str) -> list[int]:
    """Token ids without offsets: tokenizers' batch call releases the GIL while it works (the single
    encode holds it), so a server's other threads run on while a long prompt is tokenized."""
    return hf.encode_batch_fast([text], add_special_tokens=False)[0].ids


def _raise_template_error(message):
    raise TemplateError(message)
