"""user / memory: per-user API keys and the memories a user controls (pocketlm.memory)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pocketlm.memory.store import KINDS

DATA_DIR_HELP = "folder holding the users' SQLite file (default: $POCKETLM_DATA_DIR, else ./pocketlm-data)"


def _data_dir(args) -> Path:
    return Path(args.data_dir or os.environ.get("POCKETLM_DATA_DIR") or "pocketlm-data")


def _user_add(args):
    from pocketlm.memory import user_add

    key = user_add(args.name, _data_dir(args), history_days=args.history_days)
    print(f"user {args.name} added in {_data_dir(args)}; its API key (shown only now, keep it):", file=sys.stderr)
    print(key)


def _user_erase(args):
    from pocketlm.memory import user_erase

    user_erase(args.name, _data_dir(args))
    print(f"erased user {args.name}: its key, memories and history are gone from {_data_dir(args)}")


def _user_list(args):
    from pocketlm.memory import user_list

    for name in user_list(_data_dir(args)):
        print(name)


def _show(m: dict) -> str:
    return f"{m['id']:>5}  {m['kind']:<11} {'on ' if m['enabled'] else 'off'}  {m['text']}"


def _memory_add(args):
    from pocketlm.memory import memory_add

    print(_show(memory_add(args.user, _data_dir(args), args.text, kind=args.kind)))


def _memory_list(args):
    from pocketlm.memory import memory_list

    rows = memory_list(args.user, _data_dir(args), kind=args.kind)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for m in rows:
            print(_show(m))


def _memory_edit(args):
    from pocketlm.memory import memory_edit

    print(_show(memory_edit(args.user, _data_dir(args), args.id, text=args.text, kind=args.kind, enabled=args.enabled)))


def _memory_delete(args):
    from pocketlm.memory import memory_delete

    m = memory_delete(args.user, _data_dir(args), args.id)
    print(f"deleted {m['id']}: {m['text']}")


def _memory_export(args):
    from pocketlm.memory import memory_export

    text = json.dumps(memory_export(args.user, _data_dir(args)), indent=2, ensure_ascii=False) + "\n"
    if not args.out:
        sys.stdout.write(text)
        return
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:  # atomically: a half-written export is worse than none
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print(f"exported {args.user} -> {out}")


def register(sub):
    us = sub.add_parser("user", help="per-user API keys for `serve --data-dir` (add, erase, list)")
    us_sub = us.add_subparsers(dest="action", required=True)
    ua = us_sub.add_parser("add", help="create a user and print its API key (once: only a hash is kept)")
    ua.add_argument("name")
    ua.add_argument("--history-days", type=float, default=0,
                    help="keep the user's conversations this many days (default 0: not kept)")
    ue = us_sub.add_parser("erase", help="delete a user with its memories and history (the bytes, not a flag)")
    ue.add_argument("name")
    ul = us_sub.add_parser("list", help="the users' names")
    for sp, func in ((ua, _user_add), (ue, _user_erase), (ul, _user_list)):
        sp.add_argument("--data-dir", help=DATA_DIR_HELP)
        sp.set_defaults(func=func)

    me = sub.add_parser("memory", help="a user's memories: add, list, edit, delete, export")
    me_sub = me.add_subparsers(dest="action", required=True)
    ma = me_sub.add_parser("add", help="remember something for the user")
    ma.add_argument("text")
    ma.add_argument("--kind", choices=KINDS, default="fact")
    ml = me_sub.add_parser("list", help="the user's memories (id, kind, on/off, text)")
    ml.add_argument("--kind", choices=KINDS)
    ml.add_argument("--json", action="store_true", help="as JSON")
    md = me_sub.add_parser("edit", help="change a memory's text, kind, or switch it on/off")
    md.add_argument("id", type=int)
    md.add_argument("--text")
    md.add_argument("--kind", choices=KINDS)
    on = md.add_mutually_exclusive_group()
    on.add_argument("--enable", dest="enabled", action="store_const", const=True, help="use it in chats again")
    on.add_argument("--disable", dest="enabled", action="store_const", const=False, help="keep it but do not use it")
    mx = me_sub.add_parser("delete", help="delete one memory (its bytes leave the file)")
    mx.add_argument("id", type=int)
    me_ex = me_sub.add_parser("export", help="everything kept about the user, as JSON")
    me_ex.add_argument("--out", help="write here (atomically) instead of stdout")
    for sp, func in ((ma, _memory_add), (ml, _memory_list), (md, _memory_edit), (mx, _memory_delete),
                     (me_ex, _memory_export)):
        sp.add_argument("--user", required=True)
        sp.add_argument("--data-dir", help=DATA_DIR_HELP)
        sp.set_defaults(func=func)
