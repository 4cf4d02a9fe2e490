"""Users and their memories (`serve --data-dir`; pocketlm.memory behind it).

    POST   /v1/users                         admin: create a user {"name", "history_days"?}; its key, once
    GET    /v1/users                         admin: the users' names
    GET    /v1/users/me                      who this key is: {"name": the user's or null, "admin"}
    GET    /v1/users/{u}/memories            the user's memories (?kind=fact)
    POST   /v1/users/{u}/memories            add one {"text", "kind"?, "enabled"?}
    PATCH  /v1/users/{u}/memories/{id}       change text / kind / enabled
    DELETE /v1/users/{u}/memories/{id}       delete one (its bytes leave the file)
    GET    /v1/users/{u}/export              everything kept about the user (memories, history)
    DELETE /v1/users/{u}                     erase the user: its key, memories, history and adapters

The admin key reaches every user; a user's key its own name only: any other name is a 403 whether
or not it exists, so a key learns nothing of who else is there. The routes are sync (erase runs the
store on a thread): FastAPI runs
them on its thread pool, so SQLite's fsyncs never hold up the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from pocketlm.memory import MemoryStoreError, Store, UnknownMemory, UnknownUser, UserExists
from pocketlm.memory.api import export
from pocketlm.memory.store import MAX_TEXT
from pocketlm.serve.errors import APIError
from pocketlm.serve.personal import who
from pocketlm.serve.schemas import Text

router = APIRouter(prefix="/v1/users")
Kind = Literal["preference", "fact", "instruction"]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class NewUser(_Body):
    name: Text
    history_days: float = Field(0, ge=0)


class NewMemory(_Body):
    text: Text = Field(min_length=1, max_length=MAX_TEXT)
    kind: Kind = "fact"
    enabled: bool = True


class MemoryChange(_Body):
    text: Text | None = Field(None, min_length=1, max_length=MAX_TEXT)
    kind: Kind | None = None
    enabled: bool | None = None


def _store(request: Request) -> Store:
    return request.app.state.ctx.memory_store


def _admin(request: Request, what: str) -> Store:
    if not who(request).admin:
        raise APIError(403, f"{what} takes the admin key", code="forbidden")
    return _store(request)


def _user(request: Request, name: str) -> tuple[Store, int]:
    """The user `name`, if this request may reach it."""
    store, p = _store(request), who(request)
    if p.admin:
        try:
            return store, store.user_id(name)
        except MemoryStoreError as e:
            raise APIError(404, str(e), param="user", code="user_not_found") from None
    if p.user_id is None:
        raise APIError(401, "send `Authorization: Bearer KEY` with this user's key or the admin key",
                       code="invalid_api_key")
    if name != p.name:
        raise APIError(403, "user: this key reaches its own user only", param="user", code="forbidden")
    return store, p.user_id


def _do(fn, *args, **kw):
    """A store call, its errors as 4xx naming the field."""
    try:
        return fn(*args, **kw)
    except UnknownMemory as e:
        raise APIError(404, str(e), param="id", code="memory_not_found") from None
    except UnknownUser as e:  # erased meanwhile
        raise APIError(404, str(e), param="user", code="user_not_found") from None
    except UserExists as e:
        raise APIError(409, str(e), param="user", code="user_exists") from None
    except MemoryStoreError as e:  # the message starts with the field's name
        raise APIError(422, str(e), param=str(e).split(":", 1)[0], code="invalid_value") from None


@router.post("", status_code=201)
def create_user(body: NewUser, request: Request):
    store = _admin(request, "creating users")
    key = _do(store.user_add, body.name, history_days=body.history_days)
    return {"object": "user", "name": body.name, "api_key": key}


@router.get("")
def list_users(request: Request):
    store = _admin(request, "listing users")
    return {"object": "list", "data": [{"object": "user", "name": n} for n in store.users()]}


@router.get("/me")
def whoami(request: Request):
    """The web page's first question: whose memory a key reaches (a user's key learns its own name)."""
    p = who(request)
    return {"object": "user", "name": p.name, "admin": p.admin}


@router.get("/{name}/memories")
def list_memories(name: str, request: Request, kind: Kind | None = None):
    store, uid = _user(request, name)
    return {"object": "list", "data": _do(store.memory_list, uid, kind=kind)}


@router.post("/{name}/memories", status_code=201)
def add_memory(name: str, body: NewMemory, request: Request):
    store, uid = _user(request, name)
    return _do(store.memory_add, uid, body.text, body.kind, enabled=body.enabled)


@router.patch("/{name}/memories/{memory_id}")
def edit_memory(name: str, memory_id: int, body: MemoryChange, request: Request):
    store, uid = _user(request, name)
    return _do(store.memory_edit, uid, memory_id, text=body.text, kind=body.kind, enabled=body.enabled)


@router.delete("/{name}/memories/{memory_id}")
def delete_memory(name: str, memory_id: int, request: Request):
    store, uid = _user(request, name)
    return {"id": _do(store.memory_delete, uid, memory_id)["id"], "object": "memory", "deleted": True}


@router.get("/{name}/export")
def export_user(name: str, request: Request):
    store, uid = _user(request, name)
    return _do(export, store, uid)


@router.delete("/{name}")
async def erase_user(name: str, request: Request):
    store, uid = _user(request, name)
    await asyncio.to_thread(_do, store.user_erase, uid)
    await request.app.state.ctx.loras.drop_owner(uid)  # its fine-tuned adapters leave the engine too
    return {"object": "user", "name": name, "deleted": True}
