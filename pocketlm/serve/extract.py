"""Model-driven memory extraction (`serve --memory-extract model`): after the rules (pocketlm.memory.rules)
the served model itself reads the user's turn and lists what is worth remembering, as JSON under
SCHEMA with the engine's constrained decoding (pocketlm.infer.constrain.JsonSchema), so the reply is
valid by construction; the strings (printable ASCII) and the list are bounded, so it always ends
within MAX_TOKENS.
Each new memory is written like a rule's and reported in `memory_updates` with "source": "model".

Off by default: it costs one more (short, greedy) generation per chat turn that has a user's
memory on, and a small model's judgement of what is a fact is rough.
"""

from __future__ import annotations

import json

from pocketlm.infer.constrain import JsonSchema
from pocketlm.infer.sampling import SamplingParams
from pocketlm.memory.store import KINDS

MAX_ITEMS, MAX_CHARS = 3, 120
# printable ASCII without quote or backslash: no escapes and one byte a character, so the longest
# valid reply has a known number of bytes, and no token is shorter than a byte
TEXT = r"^[ !#-\[\]-~]*$"
MAX_TOKENS = len('{"memories":[]}') + MAX_ITEMS * (len('{"kind":"instruction","text":""},') + MAX_CHARS)
MAX_INPUT = 2000  # characters of the user turn the model reads
SCHEMA = {
    "type": "object",
    "properties": {"memories": {"type": "array", "maxItems": MAX_ITEMS, "items": {
        "type": "object",
        "properties": {"kind": {"enum": list(KINDS)}, "text": {"type": "string", "minLength": 3, "maxLength": MAX_CHARS,
                                                             "pattern": TEXT}},
        "required": ["kind", "text"], "additionalProperties": False}}},
    "required": ["memories"], "additionalProperties": False,
}
INSTRUCTION = ("List what the user's message says about the user that is worth remembering in later "
               "conversations: facts about them, their preferences, and standing instructions to the "
               "assistant. Write each as a short sentence about the user. Nothing worth remembering: an "
               "empty list. Answer in JSON only.")


def extraction_prompt(tokenizer, message: str) -> list[int]:
    from pocketlm.infer.generate import encode_chat

    return encode_chat(tokenizer, [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": message}])


def run(engine, message: str, params: SamplingParams | None = None):
    """The engine's finished request for one user turn (its text is the JSON)."""
    params = params or SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    return engine.generate(extraction_prompt(engine.tokenizer, message), params,
                           processors=[JsonSchema(engine.tokenizer, SCHEMA, engine.model.cfg.vocab_size)])


def extract(engine, message: str, params: SamplingParams | None = None) -> list[dict]:
    """The memories the model finds in one user turn: [{"kind", "text"}], valid against SCHEMA."""
    req = run(engine, message, params)
    if req.finish_reason != "stop":  # cut short (an error, or a token budget below the bound): nothing
        return []
    return json.loads(req.text)["memories"]


def write(store, user_id: int, found: list[dict]) -> list[dict]:
    """Add the memories not held already (same text, any case); their memory_updates records."""
    have = {m["text"].strip().lower() for m in store.memory_list(user_id)}
    updates = []
    for item in found:
        text = " ".join(item["text"].split())
        if len(text) < 3 or text.lower() in have:
            continue
        have.add(text.lower())
        m = store.memory_add(user_id, text, item["kind"])
        updates.append({"id": m["id"], "action": "add", "text": m["text"], "kind": m["kind"], "source": "model"})
    return updates
