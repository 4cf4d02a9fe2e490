"""The read path: what one chat request is told about its user, as one system block.

The user's enabled instructions and preferences always (they shape every reply), then the facts most
relevant to the last user turn by BM25 (FTS5), all within a token budget. Nothing to say -> None,
and the prompt is exactly what it would be without memory.
"""

from __future__ import annotations

import re
from typing import Callable

from pocketlm.memory.store import Store

# function words carry no topic: left in, "what is my …" would match every note with "is" or "my"
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing don down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just let me more most my myself no nor not now
of off on once only or other our ours ourselves out over own please remember same she should so some such
tell than that the their theirs them themselves then there these they this those through to too under until
up very was we were what when where which while who whom why will with would you your yours yourself
yourselves know think want wanted like get got ok okay hi hello hey thanks thank also s t d ll m re ve
""".split())

HEADER = ("What you know about this user from earlier conversations (use it where it helps, don't recite it; "
          "if they ask about themselves and the answer is not here, say you don't know):")
SECTIONS = (("instruction", "Instructions from the user:"), ("preference", "The user's preferences:"),
            ("fact", "Facts the user told you that may be relevant:"))


def content_words(text: str) -> list[str]:
    """The words of `text` that say what it is about, lower-cased, each once, in order."""
    seen, out = set(), []
    for w in re.findall(r"\w+", text.lower()):
        if w not in STOPWORDS and w not in seen and (len(w) > 1 or w.isdigit()):
            seen.add(w)
            out.append(w)
    return out


MAX_QUERY_WORDS = 32  # a long turn's last words (where the question usually is); bounds the search's cost


def fts_query(text: str, op: str = "OR") -> str:
    """An FTS5 query matching any (OR) or all (AND) content words; each word quoted, so user text is
    never read as FTS syntax."""
    return f" {op} ".join(f'"{w}"' for w in content_words(text)[-MAX_QUERY_WORDS:])


def relevant(store: Store, user_id: int, text: str, k: int = 5) -> list[dict]:
    """The top-k enabled facts for `text`, best first."""
    return store.search(user_id, fts_query(text), k=k, kinds=("fact",))


def memory_block(store: Store, user_id: int, last_user_text: str, count_tokens: Callable[[str], int],
                 budget: int = 300, k: int = 5) -> tuple[str | None, list[dict]]:
    """(the system block, the memories in it); (None, []) when there is nothing to inject.

    Items go in by priority (instructions, preferences, then facts by relevance) while the whole block
    stays within `budget` tokens as `count_tokens` counts them; one that does not fit is skipped."""
    chosen = {kind: [] for kind, _ in SECTIONS}
    for kind in ("instruction", "preference"):
        chosen[kind] = store.memory_list(user_id, kind=kind, enabled=True)
    chosen["fact"] = relevant(store, user_id, last_user_text, k=k)

    kept: dict[str, list[dict]] = {kind: [] for kind, _ in SECTIONS}
    used: list[dict] = []
    for kind, _ in SECTIONS:
        for m in chosen[kind]:
            kept[kind].append(m)
            if count_tokens(render(kept)) > budget:
                kept[kind].pop()
            else:
                used.append(m)
    if not used:
        return None, []
    return render(kept), used


def render(kept: dict[str, list[dict]]) -> str:
    """The block for these memories ({kind: [memory dicts with "text"]}), sections in SECTIONS' order."""
    lines = [HEADER]
    for kind, title in SECTIONS:
        if kept.get(kind):
            lines.append(title)
            lines.extend(f"- {m['text']}" for m in kept[kind])
    return "\n".join(lines)


def personalize(store: Store, user_id: int, messages: list[dict], count_tokens: Callable[[str], int], *,
                budget: int = 300, k: int = 5, write: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """One chat request's memory: first the write rules on the last user turn (so "forget X" is not read
    back in the same reply), then the read path. `messages` are {"role", "content": str} dicts.

    Returns (the messages to prompt with, the memory_updates, the memories injected). The block joins
    the first system message, or becomes one: chat templates take one system turn, at the start."""
    from pocketlm.memory.rules import apply_rules  # rules uses this module's word list

    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    updates = apply_rules(store, user_id, last) if write and last else []
    block, used = memory_block(store, user_id, last, count_tokens, budget=budget, k=k) if last else (None, [])
    return with_block(messages, block), updates, used


def with_block(messages: list[dict], block: str | None) -> list[dict]:
    """`messages` with the memory block joined to the first system turn (or as one); a new list."""
    if block is None:
        return list(messages)
    if messages and messages[0]["role"] in ("system", "developer"):
        return [dict(messages[0], content=f"{messages[0]['content']}\n\n{block}"), *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def block_starts() -> list[str]:
    """Blocks that differ only after the text every block with facts first (and every block with an
    instruction or preference first) begins with: a server computes those shared starts once
    (serve/personal.py), so a request's memory costs only its own items at prefill."""
    return [render({"fact": [{"text": t}]}) for t in ("first", "second")] + \
        [render({"preference": [{"text": "first"}]})]
