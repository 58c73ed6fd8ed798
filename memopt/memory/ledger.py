"""Integer bookkeeping of live storages per device: current bytes, the peak, and relabelling.

This is the torch-free half of the tracker: it is told "storage allocated / freed / resized /
relabelled / an op finished in phase P" and keeps, per device, the live bytes per category and the
breakdown at the peak. Everything is exact integer arithmetic.

Relabelling after the peak. A storage's category may only become known later (a backward
temporary becomes a ``.grad``; a tensor made in ``optimizer.step`` turns out to be state). Each
storage carries the allocation counter ``seq`` at its birth and each device's peak the counter
value at the peak instant. A storage that is alive now and was born at or before the peak was alive
at the peak, so relabelling it moves its bytes between categories of the stored peak breakdown
too — O(1), and the peak breakdown always reads in final categories. A storage resized after the
peak is re-stamped, so later relabels leave the peak's (still exact) total and categories alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memopt.memory.report import PHASES, Category, MemoryBreakdown, MemoryReport

__all__ = ["Ledger", "StorageRecord"]

_CATEGORIES: tuple[Category, ...] = tuple(Category)
_INDEX: dict[Category, int] = {c: i for i, c in enumerate(_CATEGORIES)}


@dataclass(eq=False)
class StorageRecord:
    """One live storage as the ledger sees it (mutable: category and size may change)."""

    device: str
    nbytes: int  # already rounded
    category: Category
    seq: int = 0


@dataclass
class _DeviceBook:
    live: list[int] = field(default_factory=lambda: [0] * len(_CATEGORIES))
    total: int = 0
    peak_bytes: int = 0
    peak_seq: int = -1  # allocation counter at the peak instant; -1: no peak observed yet
    peak: list[int] = field(default_factory=lambda: [0] * len(_CATEGORIES))
    peak_phase: str = "other"
    phase_peaks: dict[str, int] = field(default_factory=dict)


def _round_up(nbytes: int, round_to: int) -> int:
    return -(-nbytes // round_to) * round_to


class Ledger:
    """Per-device live bytes per category with an exact peak breakdown."""

    def __init__(self, round_to: int = 1) -> None:
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a positive int of bytes (512 mirrors CUDA's allocator), got {round_to!r}")
        self.round_to = round_to
        self._books: dict[str, _DeviceBook] = {}
        self._seq = 0

    def new(self, device: str, nbytes: int, category: Category) -> StorageRecord:
        """Count a newly seen storage of ``nbytes`` (rounded up to ``round_to``)."""
        self._seq += 1
        rec = StorageRecord(device, _round_up(nbytes, self.round_to), category, self._seq)
        self._add(self._book(device), rec.category, rec.nbytes)
        return rec

    def free(self, rec: StorageRecord) -> None:
        self._add(self._book(rec.device), rec.category, -rec.nbytes)

    def resize(self, rec: StorageRecord, nbytes: int) -> None:
        new = _round_up(nbytes, self.round_to)
        if new == rec.nbytes:
            return
        self._add(self._book(rec.device), rec.category, new - rec.nbytes)
        self._seq += 1  # re-stamp: see the module docstring
        rec.nbytes, rec.seq = new, self._seq

    def relabel(self, rec: StorageRecord, category: Category) -> None:
        if rec.category is category:
            return
        book = self._book(rec.device)
        self._add(book, rec.category, -rec.nbytes)
        self._add(book, category, rec.nbytes)
        if rec.seq <= book.peak_seq:
            book.peak[_INDEX[rec.category]] -= rec.nbytes
            book.peak[_INDEX[category]] += rec.nbytes
        rec.category = category

    def observe(self, phase: str) -> None:
        """An op boundary in ``phase``: update the per-phase and overall peaks of every device."""
        for book in self._books.values():
            if book.total > book.phase_peaks.get(phase, -1):
                book.phase_peaks[phase] = book.total
            if book.total > book.peak_bytes or book.peak_seq < 0:
                book.peak_bytes, book.peak_seq, book.peak_phase = book.total, self._seq, phase
                book.peak = list(book.live)

    def devices(self) -> list[str]:
        return list(self._books)

    def live(self, device: str) -> MemoryBreakdown:
        return _breakdown(self._book(device).live)

    def report(self, device: str) -> MemoryReport:
        book = self._book(device)
        phases = {p: book.phase_peaks[p] for p in PHASES if p in book.phase_peaks}
        return MemoryReport(
            device=device,
            peak_bytes=book.peak_bytes,
            peak=_breakdown(book.peak),
            peak_phase=book.peak_phase,
            phase_peaks=phases,
            final=_breakdown(book.live),
        )

    def _book(self, device: str) -> _DeviceBook:
        book = self._books.get(device)
        if book is None:
            book = self._books[device] = _DeviceBook()
        return book

    @staticmethod
    def _add(book: _DeviceBook, category: Category, delta: int) -> None:
        book.live[_INDEX[category]] += delta
        book.total += delta


def _breakdown(values: list[int]) -> MemoryBreakdown:
    return MemoryBreakdown(**{c.value: v for c, v in zip(_CATEGORIES, values)})
