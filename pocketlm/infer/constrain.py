"""Constrained decoding: per-request logits processors whose output is valid by construction.

- `Choice`: the reply is exactly one of N labels. A token trie holds how the tokenizer encodes each
  whole label as the reply (its canonical tokens, so the model sees the tokens it was trained on),
  then the end-of-turn token; every step masks all tokens but the trie node's children.
- `JsonSchema`: the reply is compact JSON valid against a JSON Schema. The grammar engine is
  llguidance; this module is only the glue over the model's own tokenizer.json. Measured against
  xgrammar and outlines-core on SmolLM2's 49k vocabulary, all three compute a mask in well under a
  millisecond (llguidance ~0.1 ms); llguidance compiles a schema in ~1-10 ms (outlines-core 0.2-0.5 s,
  and no allOf), and it refuses the keywords it cannot enforce by name, where xgrammar accepted
  `not` and `contains` and ignored them.
- `parse_fields`: the short field DSL `intent, order_id str?, urgency int` -> a JSON Schema.

Both follow the engine's Processor protocol: process(logits) -> logits, accept(token), forced() ->
tokens the constraint dictates next, is_done(). accept() is called for every token the reply gets,
forced ones included.
"""

from __future__ import annotations

import json
import re
import weakref

import numpy as np
import torch

from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer


class SchemaError(PocketLMError):
    """A schema, field list or label list that cannot be enforced; the message names the field or keyword."""


class ConstraintError(PocketLMError):
    """A token outside the constraint was fed to it (a caller that ignored the mask)."""


NEG_INF = float("-inf")


def end_token(tokenizer: Tokenizer) -> int:
    """The token that ends a reply: eos (the end-of-turn token of chat models), else the first stop id."""
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id
    if not tokenizer.stop_ids:
        raise SchemaError("the tokenizer has no end-of-turn or eos token to end a constrained reply with")
    return tokenizer.stop_ids[0]


# ---- one of N labels ---------------------------------------------------------------------------------
class Choice:
    """The reply is one of `labels`. After it finishes, `label` is the chosen one and `confidence` the
    probability the model gave that path: the product, over the steps where the trie branches, of the
    chosen token's softmax share among the allowed tokens (forced steps count 1)."""

    def __init__(self, tokenizer: Tokenizer, labels: list[str]):
        labels = check_labels(labels)
        self.end = end_token(tokenizer)
        self.root: dict = {}
        for label, ids in zip(labels, tokenizer.encode_batch(labels)):
            node = self.root
            for t in ids:
                node = node.setdefault(t, {})
            node[self.end] = label  # the leaf holds the label; labels are distinct so leaves never clash
        self.node: dict | str = self.root
        self.label: str | None = None
        self.logprob = 0.0
        self._logprobs: dict[int, float] | None = None

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = torch.tensor(list(self.node), dtype=torch.long)
        kept = logits[allowed].float()
        shares = kept.log_softmax(-1).tolist()
        self._logprobs = dict(zip(allowed.tolist(), shares))
        out = torch.full_like(logits, NEG_INF)
        out[allowed] = logits[allowed]
        return out

    def accept(self, token: int) -> None:
        if isinstance(self.node, str) or token not in self.node:
            raise ConstraintError(f"token {token} is not one of the allowed next tokens of the label trie")
        if self._logprobs is not None:
            self.logprob += self._logprobs.get(token, 0.0)
        self._logprobs = None
        self.node = self.node[token]
        if isinstance(self.node, str):
            self.label = self.node

    def forced(self) -> list[int]:
        """The run of tokens with no alternative from here (the rest of a label once it is unambiguous)."""
        out, node = [], self.node
        while isinstance(node, dict) and len(node) == 1:
            (t, node), = node.items()
            out.append(t)
        return out

    def is_done(self) -> bool:
        return self.label is not None

    @property
    def confidence(self) -> float | None:
        return float(np.exp(self.logprob)) if self.label is not None else None


def check_labels(labels) -> list[str]:
    if isinstance(labels, str) or not labels:
        raise SchemaError(f"labels: expected a non-empty list of strings, got {labels!r}")
    bad = [lab for lab in labels if not isinstance(lab, str) or not lab.strip()]
    if bad:
        raise SchemaError(f"labels: every label must be a non-empty string, got {bad[0]!r}")
    seen = set()
    for lab in labels:
        if lab in seen:
            raise SchemaError(f"labels: {lab!r} is given twice")
        seen.add(lab)
    return list(labels)


# ---- JSON Schema (llguidance) ------------------------------------------------------------------------
# Keywords llguidance enforces, plus pure annotations. Anything else is refused by name: llguidance
# itself refuses the ones it knows it cannot enforce (not, if/then, uniqueItems, contains, ...) but
# passes over keys it does not know at all, and a typo such as "maxLenght" must not pass silently.
ENFORCED = {"type", "properties", "required", "additionalProperties", "patternProperties", "items", "prefixItems",
            "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
            "pattern", "minLength", "maxLength", "format", "minimum", "maximum", "exclusiveMinimum",
            "exclusiveMaximum", "multipleOf", "minProperties", "maxProperties"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# compact JSON: no whitespace between tokens at all, so none can run away to max_tokens
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def check_schema(schema, where: str = "") -> None:
    """Raise SchemaError naming the first keyword (by its JSON pointer) that cannot be enforced."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"schema{where or ' root'}: expected an object, got {type(schema).__name__}")
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise SchemaError(f"schema{where}: keyword {key!r} is not supported (it cannot be enforced while "
                              f"decoding); supported: {', '.join(sorted(ENFORCED))}")
        if key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise SchemaError(f"schema{where}/{key}: expected an object of schemas")
            for name, sub in value.items():
                check_schema(sub, f"{where}/{key}/{name}")
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list):
                raise SchemaError(f"schema{where}/{key}: expected a list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}/{key}/{i}")
        elif key in ("items", "additionalProperties") and not isinstance(value, bool):
            check_schema(value, f"{where}/{key}")


_LLTOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, dict]" = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int | None = None):
    """llguidance's view of our tokenizer.json (about half a second to build: cached per tokenizer)."""
    import llguidance

    n = vocab_size or tokenizer.vocab_size
    per = _LLTOKENIZERS.setdefault(tokenizer, {})
    if n not in per:
        per[n] = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=n, eos_token=[end_token(tokenizer)])
    return per[n]


def compile_schema(schema: dict, tokenizer: Tokenizer | None = None, vocab_size: int | None = None) -> str:
    """The llguidance grammar of `schema` (compact JSON), after checking every keyword is enforceable."""
    import llguidance

    check_schema(schema)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
    except ValueError as e:
        raise SchemaError(f"schema: {e}") from e
    lltok = ll_tokenizer(tokenizer, vocab_size) if tokenizer is not None else None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error or messages:
        raise SchemaError(f"schema: {'; '.join(messages)}")
    return grammar


class JsonSchema:
    """The reply is compact JSON valid against `schema` (a dict). One instance per request."""

    def __init__(self, tokenizer: Tokenizer, schema: dict, vocab_size: int | None = None, grammar: str | None = None):
        import llguidance

        self.vocab_size = vocab_size or tokenizer.vocab_size
        grammar = grammar or compile_schema(schema, tokenizer, self.vocab_size)
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, self.vocab_size), grammar)
        if self.matcher.is_error():
            raise SchemaError(f"schema: {self.matcher.get_error()}")
        if self.matcher.is_stopped() and not self.matcher.is_accepting():  # e.g. {"$ref": "#"}: an empty language
            raise SchemaError("schema: no JSON value can be generated from it (a $ref that only leads to itself?)")
        self._bits = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32)
        self._words, self._fresh = self._bits.numpy()[0], False  # (_bits seen from numpy; fresh: this state's)

    def _mask(self) -> torch.Tensor:
        """The (1, words) bitmask of the tokens the grammar accepts next, computed once per state."""
        if not self._fresh:
            from llguidance.torch import fill_next_token_bitmask

            fill_next_token_bitmask(self.matcher, self._bits, 0)
            self._fresh = True
        return self._bits

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar accepts next."""
        bits = np.unpackbits(self._mask().numpy().view(np.uint8), bitorder="little")[:self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        # llguidance applies its bitmask to the logits directly (~0.3 ms a row less than unpacking it
        # into a bool mask over a 49k vocabulary); positions past the mask (a padded vocabulary) get -inf
        from llguidance.torch import apply_token_bitmask_inplace

        out = logits.clone()
        apply_token_bitmask_inplace(out, self._mask()[0])
        return out

    def allows(self, token: int) -> bool:
        # one bit of the mask process() would apply: no pass over the vocabulary (the mask itself is
        # the grammar's, not llguidance's validate_tokens, which also passes non-canonical tokens)
        if token >= self.vocab_size:
            return False
        self._mask()
        return (int(self._words[token >> 5]) >> (token & 31)) & 1 == 1

    def accept(self, token: int) -> None:
        self._fresh = False
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} does not fit the schema here: {self.matcher.get_error()}")

    def forced(self) -> list[int]:
        return [] if self.matcher.is_stopped() else list(self.matcher.compute_ff_tokens())

    def is_done(self) -> bool:
        return self.matcher.is_stopped()


# ---- the field DSL -----------------------------------------------------------------------------------
TYPES = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
         "number": {"type": "number"}, "bool": {"type": "boolean"}, "date": {"type": "string", "format": "date"}}
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\s+(\S+?))?(\?)?$")


def parse_fields(spec: str) -> dict:
    """`intent, order_id str?, urgency int, tone calm|angry` -> a JSON Schema of an object with those
    fields in that order. A field's type is str (the default), int, float, bool, date, or a|b|c (one of
    those strings); `?` makes it nullable (the model writes null when the text has no such value).
    Every field is required, so each output row has every column."""
    if not isinstance(spec, str) or not spec.strip():
        raise SchemaError("fields: expected a list such as 'intent, order_id str?, urgency int'")
    props: dict[str, dict] = {}
    for i, part in enumerate(spec.split(","), 1):
        m = _FIELD.match(part.strip())
        if not m:
            raise SchemaError(f"fields: item {i} {part.strip()!r}: expected 'name', 'name type' or 'name type?'")
        name, typ, optional = m.groups()
        if name in props:
            raise SchemaError(f"fields: {name!r} is given twice")
        if typ is None or typ in TYPES:
            sub = dict(TYPES[typ or "str"])
        elif "|" in typ:
            sub = {"enum": check_labels([s for s in typ.split("|")])}
        else:
            raise SchemaError(f"fields: {name!r} has unknown type {typ!r}; expected one of "
                              f"{', '.join(TYPES)} or a|b|c")
        props[name] = {"anyOf": [sub, {"type": "null"}]} if optional else sub
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def load_schema(schema) -> dict:
    """A schema given as a dict, JSON text, a path to a .json file, or the field DSL."""
    from pathlib import Path

    if isinstance(schema, dict):
        return schema
    if isinstance(schema, Path) or (isinstance(schema, str) and schema.strip().endswith(".json")):
        path = Path(schema)
        if not path.exists():
            raise SchemaError(f"{path}: schema file not found")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if isinstance(schema, str) and schema.lstrip().startswith("{"):
        try:
            return json.loads(schema)
        except json.JSONDecodeError as e:
            raise SchemaError(f"schema: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    return parse_fields(schema)
