"""Nearest-neighbour search for kNN and retrieval, by cosine: exact, or approximate (faiss)
when the bank is large.

Exact search compares every query with every bank row, a block of each at a time (memory
stays bounded, the bank is read as it is: no normalised copy of it), so its cost per query
grows with the bank. Approximate search is faiss' inverted file (``IndexIVFFlat``, inner
product on normalised rows): k-means groups the bank's rows around about √bank centroids,
and each query compares the rows of its ``PROBES`` nearest groups only. It is checked
against exact search on a sample of the queries; the recall it measures is reported with
the scores. ``auto`` searches exactly up to ``APPROXIMATE_ABOVE`` bank rows (the default
study's numbers are exact) and approximately beyond.
"""

import numpy as np

from img2prompt.data.dataset import unique_prompts
from img2prompt.errors import RunError
from img2prompt.storage.checkpoints import (
    PROVENANCE,
    check_provenance,
    load_tensors,
    save_tensors,
)

SEARCHES = ("auto", "exact", "approximate")
SIMILARITY_BLOCK = 1 << 20  # numbers in one working block: the similarities computed at once, or
                            # a block of normalised query or bank rows (4 MB of float32)
QUERY_BLOCK = 2048  # queries compared at once (fewer when wide), each with the bank a block of rows at a time
APPROXIMATE_ABOVE = 20_000  # bank rows beyond which "auto" searches approximately
PROBES = 8  # groups of bank rows each query compares
RECALL_SAMPLE = 500  # queries whose approximate answer is checked against the exact one


def unit_rows(a):
    a = np.atleast_2d(np.asarray(a, dtype=np.float32))
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


class Rows:
    """Some rows of an array, read like an array of their own (``len``, ``[slice]``,
    ``[indices]``, iteration) without a copy of them: a bank that is part of a larger array."""

    def __init__(self, array, rows):
        self.array, self.rows = array, np.asarray(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.array[self.rows[index]]

    def __iter__(self):
        return (self.array[row] for row in self.rows)


def nearest(queries, bank, centre=None, scale=None) -> np.ndarray:
    """Index of the most cosine-similar row of ``bank`` for each query (both less ``centre``
    when given), a block of queries against a block of bank rows at a time: memory holds at
    most SIMILARITY_BLOCK similarities and a normalised copy of one block of queries, never a
    queries x bank matrix or a copy of the bank. Ties go to the first row, as argmax.
    ``scale``: the bank's ``row_scales``, where they are already known."""
    scale = row_scales(bank, centre) if scale is None else scale
    index = np.zeros(len(queries), dtype=np.int64)
    step = _rows_per_block(queries)
    for q in range(0, len(queries), step):
        unit = _unit_block(queries[q:q + step], centre)
        best = np.full(len(unit), -np.inf, dtype=np.float32)
        centred = None if centre is None else unit @ np.asarray(centre, np.float32)  # q·centre
        rows = min(max(1, SIMILARITY_BLOCK // max(1, len(unit))), _rows_per_block(bank))
        for b in range(0, len(bank), rows):
            # a bank row's cosine with a unit query: (query · row − query · centre) / |row − centre|
            similarity = unit @ np.asarray(bank[b:b + rows], dtype=np.float32).T
            if centred is not None:
                similarity -= centred[:, None]
            similarity *= scale[b:b + rows]
            top = np.argmax(similarity, axis=1)
            value = similarity[np.arange(len(unit)), top]
            better = value > best
            best[better], index[q:q + step][better] = value[better], b + top[better]
    return index


def row_scales(rows, centre=None) -> np.ndarray:
    """1 / |row − centre| of each row, read a block at a time: a row's cosine with a unit query
    is then its dot product with the query, less the centre's, times this (no normalised copy)."""
    step = _rows_per_block(rows)
    return np.concatenate([1 / np.maximum(np.linalg.norm(_centred(rows[b:b + step], centre), axis=1), 1e-12)
                           for b in range(0, len(rows), step)] or [np.zeros(0, np.float32)]).astype(np.float32)


def search(queries, bank, centre=None, method="auto", seed=0):
    """Nearest bank row for each query, exactly or approximately (``method``: auto, exact,
    approximate). Returns (indices, report): the report says which search ran and, for the
    approximate one, its groups, probes and the recall measured on a sample of the queries."""
    finder = NeighbourSearch(bank, len(queries), centre, method, seed)
    return finder.nearest(queries), finder.report()


class NeighbourSearch:
    """``search`` for queries that come a block at a time, in order (the same answers and
    report as all of them at once): the bank's index is built once, and the queries of the
    recall sample are kept as their blocks go by."""

    def __init__(self, bank, queries: int, centre=None, method="auto", seed=0):
        if method not in SEARCHES:
            raise ValueError(f"search {method!r}: expected one of {', '.join(SEARCHES)}")
        self.bank, self.centre, self.queries, self.done = bank, centre, queries, 0
        self.exact = method == "exact" or (method == "auto" and len(bank) <= APPROXIMATE_ABOVE) or not queries
        if self.exact:
            self.scale = row_scales(bank, centre)  # once for every block of queries
            return
        self.index = _inverted_file(bank, centre, seed)
        rng = np.random.default_rng(seed)
        self.checked = np.sort(rng.choice(queries, min(queries, RECALL_SAMPLE), replace=False))
        self.sampled, self.found = [], []  # the checked queries and the rows found for them

    def nearest(self, block) -> np.ndarray:
        """The nearest bank row of each query of the next ``block``."""
        if self.exact:
            index = nearest(block, self.bank, self.centre, self.scale)
        else:
            index = self.index.search(_unit_block(block, self.centre), 1)[1][:, 0].astype(np.int64)
            taken = self.checked[(self.checked >= self.done) & (self.checked < self.done + len(block))] - self.done
            self.sampled.append(np.asarray(block[taken], np.float32))
            self.found.append(index[taken])
        self.done += len(block)
        return index

    def report(self) -> dict:
        """Which search ran; for the approximate one, its recall against the exact search."""
        if self.exact:
            return {"search": "exact"}
        if self.done != self.queries:
            raise ValueError(f"{self.done} of {self.queries} queries searched: the report needs them all")
        queries, found = np.concatenate(self.sampled), np.concatenate(self.found)
        unit = _unit_block(queries, self.centre)

        def cosines(rows):  # each checked query's with its row of ``rows``
            return np.sum(unit * _unit_block(self.bank[rows], self.centre), axis=1)

        similar, best = cosines(found), cosines(nearest(queries, self.bank, self.centre))
        # a hit: the row found is as similar as the exact one (a tie with another row counts)
        return {"search": "approximate", "groups": int(self.index.nlist), "probes": int(self.index.nprobe),
                "recall_checked": int(len(queries)), "recall_at_1": float(np.mean(similar >= best - 1e-6))}


def _inverted_file(bank, centre, seed):
    """A faiss inverted file over the bank's rows (less ``centre``, normalised), about √bank
    groups trained on a seeded sample of them, probing ``PROBES`` groups per query."""
    import faiss

    width = np.shape(bank[:1])[1]
    groups = max(1, int(round(np.sqrt(len(bank)))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, groups, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = np.sort(np.random.default_rng(seed).choice(len(bank), min(len(bank), 64 * groups), replace=False))
    index.train(_unit_block(bank[sample], centre))
    step = _rows_per_block(bank)
    for b in range(0, len(bank), step):  # faiss keeps its own copy of the rows, made a block at a time
        index.add(_unit_block(bank[b:b + step], centre))
    index.nprobe = min(PROBES, groups)
    return index


def _rows_per_block(rows) -> int:
    """Rows of ``rows`` read at once: at most QUERY_BLOCK, and SIMILARITY_BLOCK numbers."""
    width = int(np.prod(np.shape(rows[:1])[1:])) or 1
    return max(1, min(QUERY_BLOCK, SIMILARITY_BLOCK // width))


def _centred(rows, centre):
    block = np.array(rows, dtype=np.float32, ndmin=2)  # a new array: the rows are left as they were
    if centre is not None:
        block -= centre
    return block


def _unit_block(rows, centre):
    """``rows`` less ``centre``, normalised, in one new array."""
    block = _centred(rows, centre)
    return np.ascontiguousarray(block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12))


def save_prompt_bank(path, prompts, target_emb, provenance: dict):
    """The prompts retrieval answers with: each distinct training prompt once, with its
    target-space embedding (the rows are read in place, not copied)."""
    distinct, first = unique_prompts(prompts)
    save_tensors(path, {"target_emb": Rows(target_emb, first)}, {"prompts": distinct, PROVENANCE: provenance})


def load_prompt_bank(path, provenance: dict) -> tuple:
    """(prompts, target-space embeddings) saved at ``path``; RunError unless made from
    ``provenance``."""
    fix = "Train the run again ('img2prompt train --force')."
    tensors, metadata = load_tensors(path, "prompt bank", fix, framework="numpy", required=("prompts",))
    check_provenance(path, metadata, provenance, fix)
    prompts, bank = metadata["prompts"], tensors.get("target_emb")
    if bank is None or not isinstance(prompts, list) or len(prompts) != len(bank):
        raise RunError(f"{path}: not an img2prompt prompt bank (prompts and embeddings do not match). {fix}")
    return prompts, bank
