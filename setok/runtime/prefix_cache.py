"""The LLM's KV cache after a prompt prefix, kept across calls (a frame loop's fixed question).

The question prompt reads `<bos> question <question text> <im_start> [vision] <im_end> answer`:
everything before the vision tokens is the same for every frame asked the same question, so the
pipeline prefills it once, keeps the decoder's state (`setok.backends.decode.DecoderState`) here
under the prefix's token ids, and later prefills only the vision tokens and what follows. Least
recently used entries are evicted beyond `max_entries`; every method is thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class PrefixCache:
    def __init__(self, max_entries: int = 16):
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: tuple[int, ...]) -> Any | None:
        with self._lock:
            state = self._entries.get(key)
            if state is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return state

    def put(self, key: tuple[int, ...], state: Any) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = state
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: tuple[int, ...]) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "max_entries": self.max_entries, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions}
