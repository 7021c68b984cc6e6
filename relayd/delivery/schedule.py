"""The queue manager's schedule: which queued message is due next, in a few bytes each.

A message is scheduled at most once: ``push`` sets (or moves) its due time, ``forget`` drops
it, ``pop_due`` hands out the earliest due one, priority mail first; messages due at the
same time leave in the order they were (re)scheduled. Python objects per message (a heap
item, a dict entry, the ID string, the due float) cost ~300 bytes: 30 MB in the delivery
process with 100,000 queued. Here a message is a slot in a few typed arrays (~50 bytes,
arrays at most twice as long as needed):

- slots: the queue ID's value (a standard 18-digit ID is a 72-bit number), the due time,
  the (re)scheduling sequence number, the lane and the position in the lane's heap;
- an open-addressing hash table (array of slot numbers) finds a slot by queue ID;
- two binary heaps of slot numbers (priority, normal), ordered by (due, sequence). Each
  slot knows its position, so a rescheduled or forgotten message is moved or removed at
  once instead of leaving a stale item behind.

IDs that are not 18 upper-case hex digits (hand-made files, other versions) work the same
through a small dict on the side. The heaps are sifted in Python, not by ``heapq``'s C
code, because they hold typed arrays rather than lists of tuples (docs/performance.md,
"Memory with a backlog", has the cost).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterator

_HEX = "0123456789ABCDEF"
_STD_LEN = 18  # relayd.spool.records.new_queue_id: 13 digits of microseconds + 5 random
_ODD = 0xFFFF  # the low part of a slot whose ID is not a standard one (see _odd)
_FIB = 0x9E3779B97F4A7C15  # Fibonacci hashing: consecutive IDs spread over the table
_M64 = (1 << 64) - 1
_MIN_TABLE_BITS = 3
_MIN_SLOTS = 64
_COMPACT_MIN = 4096  # slots; below this a mostly empty schedule is not worth compacting


def _std_value(qid: str) -> int:
    """The 72-bit value of a standard queue ID, or -1 for any other string."""
    if len(qid) != _STD_LEN or qid.strip(_HEX):
        return -1
    return int(qid, 16)


class Schedule:
    """Queued message IDs with their due times, popped in (priority, due, order) order."""

    def __init__(self) -> None:
        self._seqs = itertools.count()
        self._live = 0
        self._odd: dict[str, int] = {}  # non-standard ID -> slot
        self._odd_ids: dict[int, str] = {}  # slot -> non-standard ID
        self._reset_slots(_MIN_SLOTS)
        self._reset_table(_MIN_TABLE_BITS)

    def _reset_slots(self, capacity: int) -> None:
        # Allocated once per doubling, not grown item by item: every reallocation that
        # moves a large array leaves a hole in the C heap (RSS that stays).
        self._hi = array("Q", bytes(8 * capacity))  # ID value >> 8 (standard IDs)
        self._lo = array("H", bytes(2 * capacity))  # ID value & 0xFF, or _ODD
        self._due = array("d", bytes(8 * capacity))
        self._seq = array("Q", bytes(8 * capacity))
        self._pos = array("i", bytes(4 * capacity))  # index in the lane's heap; -1: free
        self._lane = bytearray(capacity)  # 0: priority, 1: normal
        self._top = 0  # slots from here on were never used
        self._free = array("I")  # freed slots below _top
        self._heaps = (array("I"), array("I"))

    def _reset_table(self, bits: int) -> None:
        self._table = array("i", bytes(4 << bits))  # slot + 1; 0 empty, -1 deleted
        self._mask = (1 << bits) - 1
        self._shift = 64 - bits
        self._filled = 0  # buckets not empty (in use or deleted)

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._live

    def __contains__(self, qid: object) -> bool:
        return isinstance(qid, str) and self._slot(qid, _std_value(qid)) >= 0

    def due(self, qid: str) -> float | None:
        """When ``qid`` is due, or None when it is not scheduled."""
        slot = self._slot(qid, _std_value(qid))
        return None if slot < 0 else self._due[slot]

    def next_due(self) -> float | None:
        """The earliest due time in either lane (None when empty)."""
        times = [self._due[h[0]] for h in self._heaps if h]
        return min(times) if times else None

    def __iter__(self) -> Iterator[tuple[str, float, bool]]:
        """(ID, due, priority) of every scheduled message, in no particular order."""
        for lane, heap in enumerate(self._heaps):
            for slot in heap:
                yield self._id(slot), self._due[slot], lane == 0

    # -- changing ----------------------------------------------------------------------------
    def push(self, qid: str, when: float, priority: bool) -> bool:
        """Schedule ``qid`` at ``when`` (moving it if scheduled already). False, and nothing
        changes, when it is already due at exactly that time (whatever its lane)."""
        value = _std_value(qid)
        slot = self._slot(qid, value)
        lane = 0 if priority else 1
        if slot >= 0:
            if self._due[slot] == when:
                return False
            self._heap_remove(slot)
        else:
            slot = self._new_slot(qid, value)
        self._due[slot] = when
        self._seq[slot] = next(self._seqs)
        self._lane[slot] = lane
        heap = self._heaps[lane]
        heap.append(slot)
        self._sift_up(heap, len(heap) - 1)
        return True

    def forget(self, qid: str) -> None:
        """Drop ``qid`` (nothing happens if it is not scheduled)."""
        slot = self._slot(qid, _std_value(qid))
        if slot >= 0:
            self._heap_remove(slot)
            self._drop(slot)

    def pop_due(self, now: float) -> str | None:
        """The first due message (priority lane first), removed; None if none is due."""
        for heap in self._heaps:
            if heap and self._due[heap[0]] <= now:
                slot = heap[0]
                qid = self._id(slot)
                self._heap_remove(slot)
                self._drop(slot)
                return qid
        return None

    def shift(self, delta: float) -> None:
        """Move every due time by ``delta`` seconds (a wall-clock jump)."""
        due = self._due
        for heap in self._heaps:
            for slot in heap:
                due[slot] += delta
            # A uniform shift keeps the order, but float rounding can make two times equal.
            for i in reversed(range(len(heap) // 2)):
                self._sift_down(heap, i)

    # -- slots ---------------------------------------------------------------------------------
    def _id(self, slot: int) -> str:
        lo = self._lo[slot]
        if lo == _ODD:
            return self._odd_ids[slot]
        return f"{(self._hi[slot] << 8) | lo:018X}"

    def _slot(self, qid: str, value: int) -> int:
        """The slot of ``qid`` (``value``: its _std_value), or -1."""
        if value < 0:
            return self._odd.get(qid, -1)
        bucket = self._bucket(value)
        return -1 if bucket < 0 else self._table[bucket] - 1

    def _new_slot(self, qid: str, value: int) -> int:
        if value >= 0 and (self._filled + 1) * 3 > len(self._table) * 2:
            self._rehash()
        if self._free:
            slot = self._free.pop()
        else:
            if self._top == len(self._pos):
                for arr in (self._hi, self._lo, self._due, self._seq, self._pos, self._lane):
                    arr *= 2  # one reallocation; the copied values are overwritten when used
            slot = self._top
            self._top += 1
        self._pos[slot] = -1
        if value < 0:
            self._hi[slot], self._lo[slot] = 0, _ODD
            self._odd[qid] = slot
            self._odd_ids[slot] = qid
        else:
            self._hi[slot], self._lo[slot] = value >> 8, value & 0xFF
            self._insert(value, slot)
        self._live += 1
        return slot

    def _drop(self, slot: int) -> None:
        """Free ``slot`` (already out of its heap)."""
        lo = self._lo[slot]
        if lo == _ODD:
            del self._odd[self._odd_ids.pop(slot)]
        else:
            self._table[self._bucket((self._hi[slot] << 8) | lo)] = -1
        self._pos[slot] = -1
        self._free.append(slot)
        self._live -= 1
        if len(self._pos) > _COMPACT_MIN and self._live * 8 < len(self._pos):
            self._compact()  # a drained backlog gives its memory back

    # -- the hash table (standard IDs) -----------------------------------------------------------
    def _bucket(self, value: int) -> int:
        """The table index holding ``value``, or -1."""
        table, hi_arr, lo_arr, mask = self._table, self._hi, self._lo, self._mask
        hi, lo = value >> 8, value & 0xFF
        i = ((value * _FIB) & _M64) >> self._shift
        while True:
            entry = table[i]
            if entry == 0:
                return -1
            if entry > 0 and hi_arr[entry - 1] == hi and lo_arr[entry - 1] == lo:
                return i
            i = (i + 1) & mask

    def _insert(self, value: int, slot: int) -> None:
        """Put a value known to be absent into the first free bucket of its probe sequence
        (the caller keeps the table at most 2/3 full)."""
        table, mask = self._table, self._mask
        i = ((value * _FIB) & _M64) >> self._shift
        while table[i] > 0:
            i = (i + 1) & mask
        if table[i] == 0:
            self._filled += 1
        table[i] = slot + 1

    def _rehash(self) -> None:
        """A new table for about twice the live count, without the deleted buckets."""
        self._reset_table(max(_MIN_TABLE_BITS, (2 * self._live + 2).bit_length()))
        hi, lo, pos = self._hi, self._lo, self._pos
        for slot in range(self._top):
            if pos[slot] >= 0 and lo[slot] != _ODD:
                self._insert((hi[slot] << 8) | lo[slot], slot)

    def _compact(self) -> None:
        """Renumber the live slots densely (heap order kept) into arrays for about twice
        as many, and rehash."""
        hi, lo, due, seq, lane, heaps = (self._hi, self._lo, self._due, self._seq, self._lane,
                                         self._heaps)
        odd_ids = self._odd_ids
        self._reset_slots(max(_MIN_SLOTS, 2 * self._live))
        self._odd, self._odd_ids = {}, {}
        for n, heap in enumerate(heaps):
            for i, slot in enumerate(heap):
                new = self._top
                self._top += 1
                self._hi[new], self._lo[new] = hi[slot], lo[slot]
                self._due[new], self._seq[new], self._lane[new] = due[slot], seq[slot], lane[slot]
                self._pos[new] = i
                self._heaps[n].append(new)
                if lo[slot] == _ODD:
                    qid = odd_ids[slot]
                    self._odd[qid] = new
                    self._odd_ids[new] = qid
        self._rehash()

    # -- the heaps ---------------------------------------------------------------------------------
    def _heap_remove(self, slot: int) -> None:
        heap = self._heaps[self._lane[slot]]
        pos = self._pos[slot]
        last = heap.pop()
        if last != slot:
            heap[pos] = last
            self._pos[last] = pos
            self._sift_down(heap, pos)
            self._sift_up(heap, self._pos[last])
        self._pos[slot] = -1

    def _sift_up(self, heap: array[int], pos: int) -> None:
        due, seq, where = self._due, self._seq, self._pos
        slot = heap[pos]
        d, s = due[slot], seq[slot]
        while pos > 0:
            parent = (pos - 1) >> 1
            p = heap[parent]
            pd = due[p]
            if d < pd or (d == pd and s < seq[p]):
                heap[pos] = p
                where[p] = pos
                pos = parent
            else:
                break
        heap[pos] = slot
        where[slot] = pos

    def _sift_down(self, heap: array[int], pos: int) -> None:
        due, seq, where = self._due, self._seq, self._pos
        n = len(heap)
        slot = heap[pos]
        d, s = due[slot], seq[slot]
        while True:
            child = 2 * pos + 1
            if child >= n:
                break
            c = heap[child]
            cd = due[c]
            if child + 1 < n:
                r = heap[child + 1]
                rd = due[r]
                if rd < cd or (rd == cd and seq[r] < seq[c]):
                    child, c, cd = child + 1, r, rd
            if cd < d or (cd == d and seq[c] < s):
                heap[pos] = c
                where[c] = pos
                pos = child
            else:
                break
        heap[pos] = slot
        where[slot] = pos
