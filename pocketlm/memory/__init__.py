"""Per-user memory the user controls: a SQLite store (users and hashed keys, memories with FTS5,
conversation history), the read path (retrieval) and the write path (rules). Knows nothing of models:
the server passes a token counter in."""

from pocketlm.memory.api import (memory_add, memory_delete, memory_edit, memory_export, memory_list, user_add,
                                 user_erase, user_list)
from pocketlm.memory.retrieval import memory_block, personalize
from pocketlm.memory.rules import apply_rules
from pocketlm.memory.store import KINDS, MemoryStoreError, Store, UnknownMemory, UnknownUser, UserExists

__all__ = ["KINDS", "MemoryStoreError", "Store", "UnknownMemory", "UnknownUser", "UserExists", "apply_rules",
           "memory_add", "memory_block", "memory_delete", "memory_edit", "memory_export", "memory_list", "personalize",
           "user_add", "user_erase", "user_list"]
