"""Synthetic users for the memory benchmark and the memory LoRA, built from Taskmaster-4 coffee dialogs.

Two splits that share nothing: "train" users are built from data_00.json's dialogs with one set of
names, surnames, workplaces, towns, dates and never-said topics; "eval" users from data_07.json's
dialogs with another. The LoRA (benchmarks/memory_lora.py) trains on train users only and
benchmarks/memory_recall.py scores eval users, so no eval dialog, value or abstention topic is seen
in training. (Within "train", memory_lora.py keeps some users apart for its validation loss.)

A user has 4 sessions on 4 dates. A session is one real coffee-order dialog (its user and agent turns
as written) with, added to its first user turn, what a user says to an assistant with memory: one
"Remember that on DATE I ordered a DRINK." (DRINK read from the dialog's order), and across sessions
a name ("My name is ...", changed in a later session), a workplace and a home town.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (a worktree sits one folder deeper)
DATA = next((p / "shared" / "data" / "taskmaster4_coffee_dialogs" for p in REPO.parents
             if (p / "shared" / "data" / "taskmaster4_coffee_dialogs").is_dir()), None)
FILES = {"train": "data_00.json", "eval": "data_07.json"}
DRINKS = ["chai latte", "cold brew", "flat white", "hot chocolate", "iced coffee", "cappuccino", "americano",
          "macchiato", "frappuccino", "espresso", "mocha", "latte"]  # longest first: "chai latte" before "latte"
POOLS = {
    "eval": {
        "dates": ["March 3", "April 17", "May 22", "June 9", "July 14", "August 28"],
        "first": ["Ana", "Ben", "Chloe", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivo", "Jia", "Kofi", "Lena"],
        "surnames": ["Lopez", "Brooks", "Novak", "Okafor", "Tanaka", "Weber", "Silva", "Moreau", "Kowalski", "Haddad"],
        "work": ["a bakery", "the city library", "a bike shop", "the train station", "a dental clinic", "a bookshop"],
        "towns": ["Porto", "Leeds", "Graz", "Utrecht", "Lyon", "Bergen"],
        "never": [("What is my dog's name?", "dog"), ("What is my favourite film?", "film"),
                  ("What car do I drive?", "car"), ("When is my birthday?", "birthday")],
    },
    "train": {
        "dates": ["January 5", "February 11", "February 26", "September 2", "September 19", "October 8",
                  "October 30", "November 4", "November 21", "December 13", "January 23", "December 1"],
        "first": ["Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Xavi", "Yara", "Zoe",
                  "Aiko", "Bruno", "Carla", "Dario", "Elif", "Farah"],
        "surnames": ["Garcia", "Nguyen", "Petrov", "Mensah", "Kim", "Rossi", "Fischer", "Dubois", "Nowak", "Costa",
                     "Ahmed", "Jensen", "Ito", "Murphy", "Santos", "Horvat"],
        "work": ["a flower shop", "the town hall", "a hospital", "a primary school", "a car garage", "the museum",
                 "a hotel", "a law firm", "the post office", "a pharmacy", "a gym", "the airport"],
        "towns": ["Bilbao", "Cork", "Ghent", "Turin", "Krakow", "Aarhus", "Brno", "Nantes", "Leipzig", "Malmo",
                  "Split", "Basel"],
        "never": [("What is my cat called?", "cat"), ("What is my favourite colour?", "colour"),
                  ("Which phone do I have?", "phone"), ("What is my sister's name?", "sister"),
                  ("What is my favourite book?", "book"), ("What size shoes do I wear?", "shoes"),
                  ("Which football team do I support?", "football"), ("What is my wife's name?", "wife"),
                  ("How old am I?", "old"), ("What instrument do I play?", "instrument"),
                  ("Where did I go on holiday last year?", "holiday"), ("What is my favourite food?", "food")],
    },
}
ABSTAIN = ("don't know", "do not know", "dont know")


def dialogs_with_one_drink(split: str) -> list[tuple[list[dict], str]]:
    """(turns, drink) for the split's dialogs whose first user turn names exactly one drink of DRINKS."""
    if DATA is None:
        sys.exit("no shared/data/taskmaster4_coffee_dialogs found beside this checkout")
    out = []
    for d in json.loads((DATA / FILES[split]).read_text()):
        turns = [{"role": u["speaker"], "content": u["text"].strip()} for u in d["utterances"] if u["text"].strip()]
        if not turns or turns[0]["role"] != "user":
            continue
        text, found = turns[0]["content"].lower(), []
        for drink in DRINKS:
            if re.search(rf"\b{drink}s?\b", text):
                found.append(drink)
                text = re.sub(rf"\b{drink}s?\b", " ", text)
        if len(found) == 1:
            out.append((turns, found[0]))
    return out


def make_user(i: int, rng, pool: list, split: str = "eval") -> dict:
    """User `i` of `split`, taking 4 dialogs from `pool` (popped: a dialog serves one user)."""
    p = POOLS[split]
    dates = rng.sample(p["dates"], 4)
    sessions = []
    for date in dates:
        turns, drink = pool.pop()
        turns = [dict(t) for t in turns]
        turns[0]["content"] = f"Remember that on {date} I ordered a {drink}. " + turns[0]["content"]
        sessions.append({"date": date, "drink": drink, "turns": turns})
    first, (old, new) = p["first"][i % len(p["first"])], rng.sample(p["surnames"], 2)
    work, town = rng.choice(p["work"]), rng.choice(p["towns"])
    said = {0: f"My name is {first} {old}.", 1: f"Remember that I work at {work}.",
            2: f"My name is {first} {new}.", 3: f"Remember that I live in {town}."}
    for j, s in said.items():  # said at the start of that session's first user turn
        sessions[j]["turns"][0]["content"] = s + " " + sessions[j]["turns"][0]["content"]
    a, b = sorted(rng.sample(range(4), 2))
    never, word = rng.choice(p["never"])
    k = rng.randrange(4)
    questions = [
        {"type": "single", "q": f"What did I order on {sessions[k]['date']}?", "want": [sessions[k]["drink"]],
         "gold": [ordered(sessions[k])]},
        {"type": "across", "q": f"What did I order on {sessions[a]['date']} and on {sessions[b]['date']}?",
         "want": [sessions[a]["drink"], sessions[b]["drink"]], "gold": [ordered(sessions[a]), ordered(sessions[b])]},
        {"type": "updated", "q": "What is my name?", "want": [new.lower()], "not": [old.lower()], "gold": [new]},
        {"type": "fact", "q": "Where do I work?", "want": [work.split()[-1]], "gold": [work]},
        {"type": "fact", "q": "Which town do I live in?", "want": [town.lower()], "gold": [town]},
        {"type": "never", "q": never, "word": word},
    ]
    return {"name": f"{split[0]}{i}", "sessions": sessions, "questions": questions, "first": first,
            "surname": new, "old_surname": old, "work": work, "town": town}


def ordered(session) -> str:
    """The words of the memory that holds a session's order (what recall looks for among the hits)."""
    return f"on {session['date']} i ordered a {session['drink']}"


def history_block(user) -> str:
    lines = ["Earlier conversations with this user:"]
    for s in user["sessions"]:
        lines.append(f"[{s['date']}]")
        lines += [f"{t['role']}: {t['content']}" for t in s["turns"]]
    return "\n".join(lines)


def remember_sessions(store, uid: int, user, count, budget: int = 300) -> None:
    """The user's sessions through the server's write path, one user turn at a time (as `serve
    --data-dir` runs pocketlm.memory.personalize on each chat request)."""
    from pocketlm.memory import personalize

    for s in user["sessions"]:
        history = []
        for t in s["turns"]:
            if t["role"] == "user":
                personalize(store, uid, [*history, t], count, budget=budget)
            history.append(t)


def score(question, reply: str) -> bool:
    """Deterministic: lower-cased substring tests of the reply (no model judge)."""
    r = reply.lower()
    if question["type"] == "never":
        return any(a in r for a in ABSTAIN)
    return all(w in r for w in question["want"]) and not any(w in r for w in question.get("not", ()))
