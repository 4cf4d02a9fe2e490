"""Moderation: backends behind one interface (`check(text) -> Verdict`), OpenAI's /v1/moderations
shape, and an output filter for streamed replies.

Backends: "rules" (built-in word lists and phrase rules, rules.py), "classifier" (alt-profanity-check,
classifier.py), "guard" (a local Llama Guard-format model the user supplies, guard.py).
"""

from pocketlm.safety.categories import CATEGORIES, Hit, ModerationError, Verdict, moderation_inputs, moderation_response
from pocketlm.safety.stream import ModerationFilter

BACKENDS = ("rules", "classifier", "guard")

__all__ = ["BACKENDS", "CATEGORIES", "Hit", "ModerationError", "ModerationFilter", "Verdict", "get_backend",
           "moderate", "moderation_inputs", "moderation_response"]


def get_backend(name: str = "rules", guard_model=None, threshold: float = 0.5, words=None):
    """`words`: a block-list file added to the rules backend's lists (rules.load_word_file)."""
    if name == "rules":
        from pocketlm.safety.rules import RulesBackend, load_word_file
        return RulesBackend(threshold, load_word_file(words) if words else None)
    if name == "classifier":
        from pocketlm.safety.classifier import ClassifierBackend
        return ClassifierBackend(threshold)
    if name == "guard":
        from pocketlm.safety.guard import GuardBackend
        return GuardBackend(guard_model, threshold=threshold)
    raise ModerationError(f"moderation backend: expected one of {BACKENDS}, got {name!r}")


def moderate(input, backend: str = "rules", guard_model=None, threshold: float = 0.5) -> dict:
    """OpenAI's /v1/moderations response for `input` (a string, a list of strings, or text parts)."""
    return moderation_response(moderation_inputs(input), get_backend(backend, guard_model, threshold))
