"""A column of texts held compactly: one UTF-8 buffer and the offset where each text ends.

A dataset's listing (ids, prompts, image names) is read by every stage. As Python strings
in lists, each text costs 49 bytes beyond its characters plus an 8-byte slot: at 100,000
images 27 MB for 11 MB of text, and the freed strings of a loading leave the heap
fragmented. A column costs its UTF-8 bytes and 8 bytes per text; a text is made when read.
"""

from array import array
from collections.abc import Sequence

import numpy as np

# Lone surrogates (an undecodable byte of a file name, as os.scandir gives it) go through
# unchanged: a text reads back exactly as it was added.
ERRORS = "surrogatepass"


class TextColumn(Sequence):
    """Texts in one buffer, read like a list of str (``len``, ``[i]``, ``[a:b]`` a list,
    iteration, ``==`` with any sequence of str); ``append`` adds one, ``take`` picks rows."""

    def __init__(self, texts=()):
        self._buffer, self._ends = bytearray(), array("q")
        for text in texts:
            self.append(text)

    def append(self, text: str):
        self._buffer += text.encode("utf-8", ERRORS)
        self._ends.append(len(self._buffer))

    def take(self, rows) -> "TextColumn":
        """The texts at ``rows`` (indices, in that order; or a boolean mask)."""
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64, copy=False)
        ends = np.frombuffer(self._ends, dtype=np.int64) if len(self) else np.zeros(0, np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        lengths = ends[rows] - starts[rows]
        taken = TextColumn()
        taken._ends.frombytes(np.cumsum(lengths, dtype=np.int64).tobytes())
        taken._buffer = bytearray(int(lengths.sum()))  # its exact size: no growth while copied
        position = 0
        for start, length in zip(starts[rows].tolist(), lengths.tolist()):
            taken._buffer[position:position + length] = self._buffer[start:start + length]
            position += length
        return taken

    def __len__(self):
        return len(self._ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("TextColumn index out of range")
        start = self._ends[index - 1] if index else 0
        return self._buffer[start:self._ends[index]].decode("utf-8", ERRORS)

    def __iter__(self):
        start = 0
        for end in self._ends:
            yield self._buffer[start:end].decode("utf-8", ERRORS)
            start = end

    def __eq__(self, other):
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable, like a list

    def __repr__(self):
        shown = ", ".join(repr(text) for text in self[:3])
        return f"TextColumn([{shown}{', …' if len(self) > 3 else ''}], {len(self)} texts)"

    @property
    def nbytes(self) -> int:
        """The memory it holds: its text's bytes and the offsets."""
        return len(self._buffer) + self._ends.itemsize * len(self._ends)
