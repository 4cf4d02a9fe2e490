"""The write path: what a user's message asks to be remembered or forgotten, by explicit phrases and a
few simple rules. Each write or delete comes back as a `memory_updates` record
{"id", "action": "add" | "update" | "delete", "text", "kind"} for the server to report (and undo); an
update also carries "previous": {"text", "kind", "enabled"}, the memory before it, so undo restores it.

Rules, per sentence (questions are never writes):
    remember (that) X          -> X as a fact (a preference if it says "I prefer/like …", an
                                   instruction for "remember to …" / "always …" / "never …")
    forget (that / about) X    -> delete the memories holding all of X's content words
    forget everything          -> delete all the user's memories
    my name is X               -> "The user's name is X." (one per user: a new name replaces the old)
    call me X                  -> "Call the user X." (one per user)
    I prefer X                 -> "The user prefers X."
Model-driven extraction is not here (it needs constrained decoding; see the issue).
"""

from __future__ import annotations

import re

from pocketlm.memory.retrieval import content_words
from pocketlm.memory.store import Store

_LEAD = re.compile(r"^(?:(?:ok(?:ay)?|hey|hi|hello|please|also|and|so|oh|btw|by the way)\b[,!\s]*)+", re.I)
_SENTENCES = re.compile(r"(?<=[.!?;])\s+|\n+")
_NAME = r"(?P<x>[^\W\d_][\w'\- ]{0,40}?)(?:\s+(?:and|but|so)\b.*)?[.!]*$"
_RULES = (
    ("forget_all", re.compile(r"^forget (?:everything|all)(?: (?:you know )?about me| you know)?$", re.I)),
    ("remember", re.compile(r"^(?:(?:can|could|would) you |please )?remember[:,]?\s+(?:that\s+)?(?P<x>.+)$", re.I)),
    ("forget", re.compile(r"^(?:(?:can|could|would) you |please )?forget[:,]?\s+(?:that\s+|about\s+)?(?P<x>.+)$", re.I)),
    ("name", re.compile(r"^my name is " + _NAME, re.I)),
    ("call_me", re.compile(r"^(?:please )?call me " + _NAME, re.I)),
    ("prefer", re.compile(r"^i (?:generally |usually |really )?prefer (?P<x>.+)$", re.I)),
)
_INSTRUCTION = re.compile(r"^(?:to|always|never|don't|do not|please)\b\s*", re.I)
_PREFERENCE = re.compile(r"^i (?:prefer|like|love|hate|dislike|don't like|do not like|enjoy)\b", re.I)


def _clean(x: str) -> str:
    x = x.strip().rstrip(".!;,").strip()
    return x[:1].upper() + x[1:]


def _kind(x: str) -> tuple[str, str]:
    """A remembered phrase -> (its text, its kind)."""
    if _PREFERENCE.match(x):
        return _clean(x), "preference"
    if _INSTRUCTION.match(x):
        body = _INSTRUCTION.sub("", x, count=1) if x.lower().startswith("to ") else x
        return _clean(body), "instruction"
    return _clean(x), "fact"


def _record(m: dict, action: str) -> dict:
    return {"id": m["id"], "action": action, "text": m["text"], "kind": m["kind"]}


def sentences(message: str) -> list[str]:
    out = []
    for s in _SENTENCES.split(message or ""):
        s = _LEAD.sub("", s.strip()).strip()
        if s and not s.endswith("?"):
            out.append(s)
    return out


def apply_rules(store: Store, user_id: int, message: str) -> list[dict]:
    """Carry out what `message` (one user turn) asks to remember or forget; the memory_updates."""
    updates: list[dict] = []
    for s in sentences(message):
        for rule, pattern in _RULES:
            hit = pattern.match(s)
            if hit:
                updates += _apply(store, user_id, rule, hit.groupdict().get("x", ""))
                break
    return updates


def _apply(store: Store, user_id: int, rule: str, x: str) -> list[dict]:
    if rule == "forget_all":
        return [_record(store.memory_delete(user_id, m["id"]), "delete") for m in store.memory_list(user_id)]
    if rule == "forget":
        words = content_words(x)
        if not words:
            return []
        query = " AND ".join(f'"{w}"' for w in words)
        hits = store.search(user_id, query, k=100, enabled_only=False)
        return [_record(store.memory_delete(user_id, m["id"]), "delete") for m in hits]
    if rule == "name":
        return _set_slot(store, user_id, "name", f"The user's name is {_clean(x)}.", "fact")
    if rule == "call_me":
        return _set_slot(store, user_id, "call_me", f"Call the user {_clean(x)}.", "preference")
    if rule == "prefer":
        text, kind = f"The user prefers {x.strip().rstrip('.!;,')}.", "preference"
    else:
        text, kind = _kind(x)
    if not text or any(m["text"].lower() == text.lower() for m in store.memory_list(user_id)):
        return []  # said before: nothing new
    return [_record(store.memory_add(user_id, text, kind), "add")]


def _set_slot(store: Store, user_id: int, slot: str, text: str, kind: str) -> list[dict]:
    """Facts with one value per user (a name): the latest wins, as an update of the same memory."""
    old = store.memory_by_slot(user_id, slot)
    if old is None:
        return [_record(store.memory_add(user_id, text, kind, slot=slot), "add")]
    if old["text"] == text:
        return []
    previous = {"text": old["text"], "kind": old["kind"], "enabled": old["enabled"]}
    return [{**_record(store.memory_edit(user_id, old["id"], text=text, enabled=True), "update"), "previous": previous}]
