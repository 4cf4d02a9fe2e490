"""The request plumbing around the engine's steps: the queue, cancelling, listeners, streaming to an
iterator, and the background thread a server runs. Engine (engine.py) supplies step() and submit()."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class Event:
    """What a request's listener receives: new text, and finish_reason on the last event."""
    request: Any  # the Request
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | "content_filter"


class Runner:
    def __init__(self):
        self.waiting: deque = deque()
        self.slots: list = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._commands: deque = deque()  # (fn, Future): run on the engine's thread between steps
        # threads for a step of one row when the server thread runs it (None: torch's setting for every step).
        # A lone stream's step is short and has ~150 parallel regions; when its threads take every core, the
        # event loop and the clients preempt one of them and each region waits for it (serve/server.py)
        self.solo_threads: int | None = None

    def between_steps(self, fn) -> Future:
        """Run fn() on the engine's thread between two steps (now, when no thread runs), so it may change
        what a step reads (adapters) without pausing running requests for longer than it takes."""
        fut: Future = Future()
        with self._cv:
            if self._thread is not None:
                self._commands.append((fn, fut))
                self._cv.notify()
                return fut
        self._run_command(fn, fut)
        return fut

    @staticmethod
    def _run_command(fn, fut: Future) -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            fut.set_exception(e)

    def _enqueue(self, req) -> None:
        with self._cv:
            self.waiting.append(req)
            self._cv.notify()

    def cancel(self, req) -> None:
        """Stop a request (a client went away); its slot is freed at the next step."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def stream(self, prompt_ids, params, **kw) -> Iterator:
        """Submit (with submit's keywords) and yield events until the request finishes; closing the
        iterator cancels it."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        req = self.submit(prompt_ids, params, events.put, **kw)
        try:
            while True:
                if self._thread is None:
                    while events.empty():
                        if not self.step() and events.empty():
                            raise RuntimeError("engine idle but the request never finished")
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not req.finished:
                self.cancel(req)
                if self._thread is None:
                    self.step()

    def generate(self, prompt_ids, params, **kw):
        """Run one request to the end and return it (req.text, req.output_ids, req.finish_reason)."""
        for event in self.stream(prompt_ids, params, **kw):
            pass
        return event.request

    def _drop_cancelled(self):
        with self._cv:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._finish(r, "cancelled")
        for r in self.slots:
            if r is not None and r.cancelled and not r.finished:
                self._finish(r, "cancelled")

    def _emit(self, req, text: str, finish_reason: str | None = None):
        if req.on_event is not None:
            try:
                req.on_event(Event(req, text, finish_reason))
            except Exception:  # noqa: BLE001 - a broken listener loses its own request only
                req.cancelled = True

    # ---- background thread (servers) -----------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    def start(self):
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, args=(torch.get_num_threads(),),
                                            name="pocketlm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self, full: int):
        try:
            self._serve_steps(full)
        finally:  # torch's setting is the process's: give the caller back its own
            if torch.get_num_threads() != full:
                torch.set_num_threads(full)

    def _serve_steps(self, full: int):
        now = None
        while True:
            with self._cv:
                while (not self._stopping and not self.waiting and not self._commands
                       and all(r is None for r in self.slots)):
                    self._cv.wait()
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, fut in commands:
                self._run_command(fn, fut)
            if self.solo_threads:
                want = self.solo_threads if self.running == 1 and not self.waiting else full
                if want != now:  # (torch's count is the process's; _loop restores the caller's at the end)
                    torch.set_num_threads(want)
                    now = want
            self.step()
        with self._cv:  # nobody will run these now
            for _, fut in self._commands:
                fut.set_exception(RuntimeError("the engine stopped"))
            self._commands.clear()
