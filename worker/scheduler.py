"""Which sequences run, which wait, and which KV pages and batch row each holds: plain Python, no device.

Admission is first come, first served: the oldest waiting sequence joins when a row is free and the pool has every
page it can ever need (its prompt plus its token budget), reserved at once. A running sequence therefore never
runs out of pages and is never preempted or corrupted; when the pool is short, new sequences wait (and the head of
the line is not overtaken, so a long request is not starved by short ones).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from worker.kv_cache import NULL_PAGE, pages_for


class PagePool:
    """The free physical pages of the KV pool (page NULL_PAGE is never handed out)."""

    def __init__(self, pages: int):
        self.total = pages - 1
        self._free = [p for p in range(pages - 1, -1, -1) if p != NULL_PAGE]

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.total - self.free

    def take(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        out, self._free = self._free[len(self._free) - n :][::-1], self._free[: len(self._free) - n]
        return out

    def give(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


@dataclass(eq=False)
class Sequence:
    """One generation's host state. `budget`: the most tokens it may produce (max_tokens, or less where the
    context ends first). `owner`: whatever the caller ties to it (the engine's job)."""

    ids: list[int]
    budget: int
    max_tokens: int
    params: Any = None  # worker.sampling.SamplingParams
    key: Any = None  # the seed's PRNG key data, uint32 [2]
    stop_at_eos: bool = True
    owner: Any = None
    row: int | None = None
    pages: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt ids already in the cache
    dispatched: int = 0  # tokens sampled or queued for sampling
    produced: int = 0  # tokens handed to the caller
    finished: str | None = None  # the stop reason, once it ends
    plan: Any = None  # its params' SamplingPlan, once it has joined a batch

    @property
    def decoding(self) -> bool:
        return self.row is not None and self.prefilled == len(self.ids) and self.dispatched > 0

    @property
    def prefilling(self) -> bool:
        return self.row is not None and self.prefilled < len(self.ids)

    def pages_needed(self, page_size: int) -> int:
        # Every position a token is fed at: the prompt's and all but the last generated token's.
        return pages_for(len(self.ids) + self.budget - 1, page_size)


class Scheduler:
    def __init__(self, max_batch: int, pages: int, page_size: int):
        self.rows: list[Sequence | None] = [None] * max_batch
        self.pool = PagePool(pages)
        self.page_size = page_size
        self.waiting: deque[Sequence] = deque()
        self._admitted: list[Sequence] = []  # running sequences in admission order

    def add(self, seq: Sequence) -> None:
        if seq.pages_needed(self.page_size) > self.pool.total:
            raise ValueError(f"a sequence of {len(seq.ids)} + {seq.budget} tokens exceeds the whole KV pool")
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free rows while their pages are available, oldest first."""
        joined = []
        while self.waiting and None in self.rows:
            seq = self.waiting[0]
            pages = self.pool.take(seq.pages_needed(self.page_size))
            if pages is None:
                break
            self.waiting.popleft()
            seq.pages, seq.row = pages, self.rows.index(None)
            self.rows[seq.row] = seq
            self._admitted.append(seq)
            joined.append(seq)
        return joined

    def release(self, seq: Sequence) -> None:
        """Free what `seq` holds (idempotent); a waiting sequence just leaves the line."""
        if seq.row is not None and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
            self._admitted.remove(seq)
            self.pool.give(seq.pages)
            seq.pages = []
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.row = None

    @property
    def running(self) -> list[Sequence]:
        return list(self._admitted)

    def prefilling(self) -> list[Sequence]:
        """Sequences with prompt left to feed, oldest admission first."""
        return [s for s in self._admitted if s.prefilling]

    def decoding(self) -> list[Sequence]:
        return [s for s in self.rows if s is not None and s.decoding and s.dispatched < s.budget]
