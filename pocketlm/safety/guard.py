"""A guard model the user supplies (Llama Guard 3 or any model fine-tuned on its format), run
locally: the prompt in Llama Guard's format, the model's greedy reply, and the reply parsed back
into a Verdict with OpenAI's category keys.

Llama Guard replies "safe", or "unsafe" and a second line of category codes ("S1,S10"). Its
hazard taxonomy (MLCommons') is mapped to the nearest OpenAI keys; codes OpenAI has no key for
(specialized advice, privacy, intellectual property, elections) still flag the text.
"""

from __future__ import annotations

import re

from pocketlm.safety.categories import ModerationError, Verdict

GUARD_CATEGORIES = (("S1", "Violent Crimes"), ("S2", "Non-Violent Crimes"), ("S3", "Sex Crimes"),
                    ("S4", "Child Exploitation"), ("S5", "Defamation"), ("S6", "Specialized Advice"),
                    ("S7", "Privacy"), ("S8", "Intellectual Property"), ("S9", "Indiscriminate Weapons"),
                    ("S10", "Hate"), ("S11", "Self-Harm"), ("S12", "Sexual Content"), ("S13", "Elections"),
                    ("S14", "Code Interpreter Abuse"))
TO_OPENAI = {"S1": ("violence", "illicit/violent"), "S2": ("illicit",), "S3": ("sexual",),
             "S4": ("sexual/minors", "sexual"), "S5": ("harassment",), "S9": ("illicit/violent", "violence"),
             "S10": ("hate",), "S11": ("self-harm",), "S12": ("sexual",), "S14": ("illicit",)}


def _speaker(role: str) -> str:
    return "Agent" if role == "assistant" else "User"


def guard_prompt(messages: list[dict], categories=GUARD_CATEGORIES) -> str:
    """The task text for the conversation's last turn ('User' for a prompt, 'Agent' for a reply)."""
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    if not turns:
        raise ModerationError("guard: the conversation has no user or assistant message")
    role = _speaker(turns[-1]["role"])
    conversation = "\n\n".join(f"{_speaker(m['role'])}: {m['content']}" for m in turns)
    policy = "\n".join(f"{code}: {name}." for code, name in categories)
    return (f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
            f"policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{policy}\n"
            f"<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
            f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
            " - First line must read 'safe' or 'unsafe'.\n"
            " - If unsafe, a second line must include a comma-separated list of violated categories.")


def guard_chat_text(tokenizer, messages: list[dict]) -> str:
    """The full prompt for the guard model: Llama Guard's own chat template builds the task from the
    conversation itself; any other template gets our task text as one user message."""
    if "UNSAFE CONTENT CATEGORIES" in tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.apply_chat_template([{"role": "user", "content": guard_prompt(messages)}], add_generation_prompt=True)


def parse_guard_reply(reply: str, threshold: float = 0.5, on_unparsed: str = "flag") -> Verdict:
    """'safe' | 'unsafe\\nS1,S10' -> Verdict. A reply that is neither flags the text by default
    (fail closed: a guard that cannot answer should not wave content through)."""
    v = Verdict.empty(threshold)
    lines = [l.strip() for l in reply.strip().splitlines() if l.strip()]
    head = lines[0].lower() if lines else ""
    if head == "safe":
        v.flagged_override = False
        return v
    if head != "unsafe":
        v.flagged_override = on_unparsed == "flag"
        v.detail = {"unparsed": reply[:200]}
        return v
    codes = re.findall(r"S\d+", " ".join(lines[1:]).upper())
    for code in codes:
        for cat in TO_OPENAI.get(code, ()):
            v.raise_score(cat, 1.0)
    v.flagged_override = True
    v.detail = {"categories": codes}
    return v


class GuardBackend:
    """check(text) asks the guard model about `text` as a user message; check_conversation() about
    the last turn of a conversation (an assistant reply is judged in the context of the prompt)."""
    name = "llama-guard"

    def __init__(self, model_source=None, *, model=None, tokenizer=None, threshold: float = 0.5,
                 max_new_tokens: int = 16, on_unparsed: str = "flag"):
        if on_unparsed not in ("flag", "pass"):
            raise ModerationError(f"guard: on_unparsed must be 'flag' or 'pass', got {on_unparsed!r}")
        if model is None:
            if model_source is None:
                raise ModerationError("guard: give the guard model (a checkpoint, Hugging Face folder or .gguf file)")
            from pocketlm.model import load_model
            model, tokenizer = load_model(model_source)
        if tokenizer is None:
            raise ModerationError(f"guard: {model_source or 'the model'} has no tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.threshold, self.max_new_tokens, self.on_unparsed = threshold, max_new_tokens, on_unparsed
        if model_source is not None:
            self.name = f"llama-guard:{model_source}"

    def reply(self, messages: list[dict]) -> str:
        from pocketlm.eval.tasks import greedy_generate

        ids = self.tokenizer.encode(guard_chat_text(self.tokenizer, messages))
        out = greedy_generate(self.model, self.tokenizer, [ids], self.max_new_tokens, batch_size=1)[0]
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def check_conversation(self, messages: list[dict]) -> Verdict:
        return parse_guard_reply(self.reply(messages), self.threshold, self.on_unparsed)

    def check(self, text: str) -> Verdict:
        return self.check_conversation([{"role": "user", "content": text}])
