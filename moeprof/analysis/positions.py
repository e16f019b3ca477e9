"""Which (group, position) keys a stream of routes has shown: one bit per position.

``validate`` finds repeated keys and holes in token positions with it; the contamination
detector finds double logging with it.
"""

from __future__ import annotations

import numpy as np


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices start_0..start_0+len_0-1, start_1.., concatenated, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(total)


class PositionSet:
    """Which (group, position) keys have been seen, one bit per position.

    A group is one (request, layer) pair; a position is a token index. Duplicate detection and
    gap finding need the set of positions per group; a bit each keeps 10M routes in about
    2.5 MB (regions grow by doubling, abandoned regions are not reused). Positions beyond
    ``FAR`` (no real sequence is that long) go to a plain set so a bogus index cannot blow up
    memory.
    """

    FAR = 1 << 24

    def __init__(self) -> None:
        self._bits = np.zeros(1 << 16, np.uint8)
        self._used = 0
        self._base = np.zeros(0, np.int64)
        """Byte offset of each group's region in ``_bits``."""
        self._cap = np.zeros(0, np.int64)
        """Positions each region holds (a multiple of 8)."""
        self.count = np.zeros(0, np.int64)
        """Distinct positions seen per group."""
        self.lo = np.zeros(0, np.int64)
        self.hi = np.zeros(0, np.int64)
        self._far: dict[int, set[int]] = {}

    @property
    def groups(self) -> int:
        return int(self.count.size)

    @property
    def nbytes(self) -> int:
        return int(self._bits.nbytes + 5 * self.count.nbytes)

    def _ensure_groups(self, size: int) -> None:
        old = self.count.size
        if size <= old:
            return
        grow = size - old
        self._base = np.concatenate([self._base, np.zeros(grow, np.int64)])
        self._cap = np.concatenate([self._cap, np.zeros(grow, np.int64)])
        self.count = np.concatenate([self.count, np.zeros(grow, np.int64)])
        self.lo = np.concatenate([self.lo, np.full(grow, np.iinfo(np.int64).max, np.int64)])
        self.hi = np.concatenate([self.hi, np.full(grow, -1, np.int64)])

    def _ensure_capacity(self, groups: np.ndarray, need: np.ndarray) -> None:
        """Give each of ``groups`` a region of at least ``need`` positions, copying old bits."""
        new_cap = np.maximum(np.maximum(need, 2 * self._cap[groups]), 256)
        new_cap = (new_cap + 7) // 8 * 8
        nbytes = new_cap // 8
        total = int(nbytes.sum())
        if self._used + total > self._bits.size:
            bigger = np.zeros(max(2 * self._bits.size, self._used + total), np.uint8)
            bigger[: self._used] = self._bits[: self._used]
            self._bits = bigger
        new_base = self._used + np.cumsum(nbytes) - nbytes
        old_bytes = self._cap[groups] // 8
        src = _concat_ranges(self._base[groups], old_bytes)
        dst = _concat_ranges(new_base, old_bytes)
        self._bits[dst] = self._bits[src]
        self._base[groups] = new_base
        self._cap[groups] = new_cap
        self._used += total

    def add(self, group: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Record keys; returns a mask of rows whose key was seen before (earlier chunk or
        earlier row of this chunk), i.e. every copy after the first."""
        n = group.size
        dup = np.zeros(n, bool)
        if n == 0:
            return dup
        group = group.astype(np.int64, copy=False)
        pos = pos.astype(np.int64, copy=False)
        self._ensure_groups(int(group.max()) + 1)
        near = pos < self.FAR
        if not near.all():
            for i in np.flatnonzero(~near):
                seen = self._far.setdefault(int(group[i]), set())
                p = int(pos[i])
                dup[i] = p in seen
                seen.add(p)
            g, p = group[near], pos[near]
        else:
            g, p = group, pos
        if g.size:
            batch_hi = np.full(self.count.size, -1, np.int64)
            np.maximum.at(batch_hi, g, p)
            grow = np.flatnonzero(batch_hi >= self._cap)
            if grow.size:
                self._ensure_capacity(grow, batch_hi[grow] + 1)
            bit = self._base[g] * 8 + p
            byte = bit >> 3
            mask = np.left_shift(1, bit & 7).astype(np.uint8)
            near_dup = (self._bits[byte] & mask) != 0
            ordered = np.sort(bit)
            if (ordered[1:] == ordered[:-1]).any():
                order = np.argsort(bit, kind="stable")
                s = bit[order]
                near_dup[order[1:]] |= s[1:] == s[:-1]
            np.bitwise_or.at(self._bits, byte, mask)
            dup[near] = near_dup
        fresh = ~dup
        self.count += np.bincount(group[fresh], minlength=self.count.size)
        np.minimum.at(self.lo, group, pos)
        np.maximum.at(self.hi, group, pos)
        return dup

    def first_missing(self, group: int) -> int | None:
        """The lowest position in [lo, hi] of ``group`` that was never seen (None if none)."""
        lo, hi = int(self.lo[group]), int(self.hi[group])
        if hi < 0:
            return None
        top = min(hi, int(self._cap[group]) - 1)
        base = int(self._base[group])
        region = self._bits[base : base + (top + 8) // 8]
        present = np.unpackbits(region, bitorder="little")[lo : top + 1].astype(bool)
        missing = np.flatnonzero(~present)
        if missing.size:
            return lo + int(missing[0])
        far = self._far.get(group, set())
        p = top + 1
        while p <= hi:
            if p not in far:
                return p
            p += 1
        return None
