"""Nearest-neighbour search for kNN and retrieval, by cosine: exact, or approximate when the
bank is large.

Exact search compares every query with every bank row, a block of each at a time (memory
stays bounded), so its cost per query grows with the bank: quadratic over a study whose test
and training splits both grow. Approximate search is an inverted file: k-means groups the
bank's rows around centroids, and each query compares the centroids and then only the rows
of its ``PROBES`` nearest groups. With about √(probes × bank) groups (fewer when the queries are
fewer than the bank: the rows' assignment costs too), its cost per query grows with the
square root of the bank. It is checked against exact search on a sample of the queries
(which skips the groups too far from a query to hold a row as similar as the one found);
the recall it measures is reported with the scores. ``auto`` searches exactly up to
``APPROXIMATE_ABOVE`` bank rows (the default study's numbers are exact) and approximately
beyond.
"""

import numpy as np

SEARCHES = ("auto", "exact", "approximate")
SIMILARITY_BLOCK = 1 << 20  # numbers in one working block: the similarities computed at once, or
                            # a block of normalised query or bank rows (4 MB of float32)
QUERY_BLOCK = 2048  # queries compared at once (fewer when wide), each with the bank a block of rows at a time
APPROXIMATE_ABOVE = 20_000  # bank rows beyond which "auto" searches approximately
PROBES = 8  # groups of bank rows each query compares
KMEANS_ITERATIONS = 5  # on the 100,000-image benchmark's banks the 5th is within 0.3% of the objective
                       # the 15th reaches, and the recall was the same as with 10 (99.2% kNN, 98.6% retrieval)
SAMPLE_PER_GROUP = 16  # k-means runs on this many bank rows per centroid (a seeded sample)
RECALL_SAMPLE = 500  # queries whose approximate answer is checked against the exact one
BOUND_PADDING = 1e-5  # float32 cosines are good to about 1e-6: the bounds that skip groups allow ten times that


def unit_rows(a):
    a = np.atleast_2d(np.asarray(a, dtype=np.float32))
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


class Rows:
    """Some rows of an array (or texts of a ``TextColumn``), read like an array of their own
    (``len``, ``[slice]``, ``[indices]``, iteration) without a copy of them: a bank that is
    part of a larger array."""

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
    queries x bank matrix or a copy of the whole bank. Ties go to the first row, as argmax.
    ``scale``: the bank's ``row_scales``, where they are already known."""
    scale = row_scales(bank, centre) if scale is None else scale
    index = np.zeros(len(queries), dtype=np.int64)
    step = _rows_per_block(queries)
    for q in range(0, len(queries), step):
        _compare(_unit_block(queries[q:q + step], centre), bank, centre, np.arange(len(bank)), scale,
                 np.full(min(step, len(queries) - q), -np.inf, dtype=np.float32), index[q:q + step])
    return index


def row_scales(rows, centre=None) -> np.ndarray:
    """1 / |row − centre| of each row, read a block at a time: a row's cosine with a unit query
    is then its dot product with the query, less the centre's, times this (no normalised copy)."""
    step = _rows_per_block(rows)
    return np.concatenate([_unit_and_scale(rows[b:b + step], centre)[1] for b in range(0, len(rows), step)]
                          or [np.zeros(0, np.float32)])


def search(queries, bank, centre=None, method="auto", seed=0):
    """Nearest bank row for each query, exactly or approximately (``method``: auto, exact,
    approximate). Returns (indices, report): the report says which search ran and, for the
    approximate one, its groups, probes and the recall measured on a sample of the queries."""
    finder = NeighbourSearch(bank, len(queries), centre, method, seed)
    return finder.nearest(queries), finder.report()


class NeighbourSearch:
    """``search`` for queries that come a block at a time, in order (the same answers and
    report as all of them at once): the bank's index is built once, and the queries of the
    recall sample are kept as their blocks go by, so that no block outlives its turn."""

    def __init__(self, bank, queries: int, centre=None, method="auto", seed=0):
        if method not in SEARCHES:
            raise ValueError(f"search {method!r}: expected one of {', '.join(SEARCHES)}")
        self.bank, self.centre, self.queries, self.done = bank, centre, queries, 0
        self.exact = method == "exact" or (method == "auto" and len(bank) <= APPROXIMATE_ABOVE) or not queries
        if self.exact:
            self.scale = row_scales(bank, centre)  # once for every block of queries
        else:
            rng = np.random.default_rng(seed)
            self.inverted = InvertedFile(bank, centre, rng, queries)
            self.scale = self.inverted.scale
            self.checked = np.sort(rng.choice(queries, min(queries, RECALL_SAMPLE), replace=False))
            self.sampled, self.found = None, np.zeros(len(self.checked), dtype=np.int64)  # the checked queries, their rows

    def nearest(self, block) -> np.ndarray:
        """The nearest bank row of each query of the next ``block``."""
        if self.exact:
            index = nearest(block, self.bank, self.centre, self.scale)
        else:
            index = self.inverted.nearest(block)
            if self.sampled is None:  # made once: small arrays left between the blocks would fragment the heap
                self.sampled = np.zeros((len(self.checked), *np.shape(block)[1:]), dtype=np.float32)
            taken = (self.checked >= self.done) & (self.checked < self.done + len(block))
            self.sampled[taken] = block[self.checked[taken] - self.done]
            self.found[taken] = index[self.checked[taken] - self.done]
        self.done += len(block)
        return index

    def report(self) -> dict:
        """Which search ran; for the approximate one, its recall against the exact search."""
        if self.exact:
            return {"search": "exact"}
        if self.done != self.queries:
            raise ValueError(f"{self.done} of {self.queries} queries searched: the report needs them all")
        queries, found = self.sampled, self.found
        unit_checked = _unit_block(queries, self.centre, gathered=True)  # normalised once for all

        def cosines(rows):  # each checked query's with its row of ``rows``
            return np.sum(unit_checked * _unit_block(self.bank[rows], self.centre), axis=1)

        similar = cosines(found)
        best = cosines(self.inverted.exact_nearest(unit_checked, similar))
        # a hit: the row found is as similar as the exact one (a tie with another row counts)
        recall = float(np.mean(similar >= best - 1e-6))  # queries > 0: else the search is exact
        return {"search": "approximate", "groups": self.inverted.groups, "probes": self.inverted.probes,
                "recall_checked": int(len(queries)), "recall_at_1": recall}


class InvertedFile:
    """The bank's rows grouped by their nearest k-means centroid (cosine, after ``centre``).
    Holds the centroids, each group's ``spread`` (the widest angle between one of its rows and
    its centroid), one group number and the ``row_scales`` of each row, never a copy of the
    bank."""

    def __init__(self, bank, centre, rng, queries, probes=PROBES):
        self.bank, self.centre = bank, centre
        # the fewest comparisons in all: assigning the rows (bank x groups), choosing the
        # groups (queries x groups), comparing their rows (queries x probes x bank / groups)
        best = np.sqrt(queries * probes * len(bank) / (queries + len(bank)))
        self.groups = int(min(len(bank), max(1, round(best))))
        self.probes = min(probes, self.groups)
        sample = np.sort(rng.choice(len(bank), min(len(bank), SAMPLE_PER_GROUP * self.groups), replace=False))
        self.centroids = _spherical_kmeans(Rows(bank, sample), centre, self.groups, rng)
        step, every_group = _rows_per_block(bank), np.arange(self.groups)
        unit_centroids = np.ones(self.groups, np.float32)  # the centroids' row_scales
        group_of, scales = np.zeros(len(bank), np.int64), []
        closeness = np.full(len(bank), -np.inf, np.float32)  # each row's cosine with its group's centroid
        for b in range(0, len(bank), step):  # each row's group, and its scale on the way
            unit, scale = _unit_and_scale(bank[b:b + step], centre)
            _compare(unit, self.centroids, None, every_group, unit_centroids, closeness[b:b + step],
                     group_of[b:b + step])
            scales.append(scale)
        self.scale = np.concatenate(scales)
        least = np.ones(self.groups)
        np.minimum.at(least, group_of, closeness - BOUND_PADDING)
        self.spread = np.arccos(np.clip(least, -1, 1))
        self.rows = np.argsort(group_of, kind="stable")  # each group's rows, in bank order
        self.starts = np.searchsorted(group_of[self.rows], np.arange(self.groups + 1))

    def nearest(self, queries) -> np.ndarray:
        """For each query, the most similar row among its ``probes`` nearest groups'."""
        step = min(_rows_per_block(queries), max(1, SIMILARITY_BLOCK // self.groups))  # bounds the similarities
        probed = np.concatenate([self._nearest_groups(_unit_block(queries[q:q + step], self.centre))
                                 for q in range(0, len(queries), step)])
        return self._nearest_in(queries, np.repeat(np.arange(len(queries)), self.probes), probed.ravel())

    def exact_nearest(self, unit_queries, reached) -> np.ndarray:
        """For each query (less ``centre``, normalised), the most similar row of the whole
        bank, given a cosine ``reached`` by one of its rows (the approximate answer's). Compares
        only the groups that may hold a row as similar: a row within ``spread`` of its centroid
        is at least the query's angle to that centroid less ``spread`` from the query. On the
        100,000-image benchmark's banks the recall check then compares each query with 41% of
        the kNN bank's rows and 38% of the retrieval bank's (0.35 s, not 0.52, for kNN)."""
        cosine = unit_queries @ self.centroids.T + BOUND_PADDING
        angle = np.arccos(np.clip(cosine, -1, 1))  # padded: no smaller than the true angle
        reach = np.cos(np.maximum(0, angle - self.spread))  # the most similar row each group can hold
        asked, groups = np.nonzero(reach >= np.asarray(reached)[:, None] - BOUND_PADDING)
        return self._nearest_in(unit_queries, asked, groups, unit=True)

    def _nearest_in(self, queries, asked, groups, unit=False) -> np.ndarray:
        """For each query, the most similar row of the groups it is paired with: query
        ``asked[i]`` with group ``groups[i]``, the rows of each group read once for all its
        queries. ``unit``: the queries are already less ``centre`` and normalised."""
        step = min(_rows_per_block(queries), max(1, SIMILARITY_BLOCK // self.groups))  # bounds the similarities
        pairs = np.argsort(groups, kind="stable")  # the pairs by group
        pair_starts = np.searchsorted(groups[pairs], np.arange(self.groups + 1))
        best = np.full(len(queries), -np.inf, dtype=np.float32)
        index = np.zeros(len(queries), dtype=np.int64)
        for group in range(self.groups):
            rows = self.rows[self.starts[group]:self.starts[group + 1]]
            asking = asked[pairs[pair_starts[group]:pair_starts[group + 1]]]
            for q in range(0, len(asking), step):
                who = asking[q:q + step]
                found, found_index = best[who], index[who]  # copies: updated, then written back
                chosen = queries[who] if unit else _unit_block(queries[who], self.centre, gathered=True)
                _compare(chosen, self.bank, self.centre, rows, self.scale, found, found_index)
                best[who], index[who] = found, found_index
        return index

    def _nearest_groups(self, unit_queries):
        similarity = unit_queries @ self.centroids.T
        probed = np.empty((len(similarity), self.probes), dtype=np.int64)
        for p in range(self.probes):  # the best, the next best, ...: no ranks as large as the similarities
            probed[:, p] = np.argmax(similarity, axis=1)
            similarity[np.arange(len(similarity)), probed[:, p]] = -np.inf
        return probed


def _compare(unit_queries, bank, centre, rows, scale, best, index):
    """Update ``best`` (similarity) and ``index`` (bank row) of each query with the bank's
    ``rows``, a block of rows at a time (at most SIMILARITY_BLOCK similarities at once).
    ``scale``: the bank's ``row_scales``, so that its rows are read as they are, never
    centred and normalised in copies."""
    step = min(max(1, SIMILARITY_BLOCK // max(1, len(unit_queries))), _rows_per_block(bank))
    centred = None if centre is None else unit_queries @ np.asarray(centre, np.float32)  # q·centre
    for b in range(0, len(rows), step):
        block = rows[b:b + step]
        # a contiguous block is read as a view, other rows gathered
        contiguous = block[-1] - block[0] + 1 == len(block)
        picked = slice(block[0], block[-1] + 1) if contiguous else block
        similarity = unit_queries @ np.asarray(bank[picked], dtype=np.float32).T
        if centred is not None:
            similarity -= centred[:, None]
        similarity *= scale[picked]
        top = np.argmax(similarity, axis=1)
        value = similarity[np.arange(len(unit_queries)), top]
        better = value > best
        best[better], index[better] = value[better], block[top[better]]
        del similarity  # before the next block's are made


def _spherical_kmeans(points, centre, k, rng, iterations=KMEANS_ITERATIONS):
    """``k`` unit centroids of ``points`` less ``centre`` (Lloyd's iterations, cosine); a
    centroid that loses all its points stays where it was. The points (``Rows`` of the bank)
    are gathered and normalised a block at a time: no copy of them all is held."""
    centroids = _unit_block(points[np.sort(rng.choice(len(points), k, replace=False))], centre, gathered=True)
    step = _rows_per_block(points)
    for _ in range(iterations):
        sums, counts = np.zeros_like(centroids), np.zeros(k, dtype=np.int64)
        for b in range(0, len(points), step):
            block = _unit_block(points[b:b + step], centre, gathered=True)
            assigned = nearest(block, centroids, scale=np.ones(k, np.float32))  # unit rows
            # each group's sum: the block's rows ordered by group, each group's run summed as a
            # slice (np.add.at, one row at a time, took 0.8 s of the 100,000-image evaluation's
            # 5; np.add.reduceat over the rows 0.27 s, five times the slices' sums)
            order = np.argsort(assigned, kind="stable")
            present, starts = np.unique(assigned[order], return_index=True)
            for group, run in zip(present, np.split(block[order], starts[1:])):
                sums[group] += run.sum(axis=0)
            counts += np.bincount(assigned, minlength=k)
        held = np.flatnonzero(counts)
        centroids = centroids.copy()
        centroids[held] = unit_rows(sums[held])
    return centroids


def _rows_per_block(rows) -> int:
    """Rows of ``rows`` read at once: at most QUERY_BLOCK, and SIMILARITY_BLOCK numbers."""
    width = int(np.prod(np.shape(rows[:1])[1:])) or 1
    return max(1, min(QUERY_BLOCK, SIMILARITY_BLOCK // width))


def _unit_block(rows, centre, gathered=False):
    """``rows`` less ``centre``, normalised, in one new array (the rows are left as they were);
    ``gathered``: ``rows`` is already a new array (rows picked by index), normalised in place."""
    return _unit_and_scale(rows, centre, gathered)[0]


def _unit_and_scale(rows, centre, gathered=False):
    """``_unit_block`` and the scale that normalised each row (1 / |row − centre|)."""
    block = np.asarray(rows, dtype=np.float32) if gathered else np.array(rows, dtype=np.float32, ndmin=2)
    if centre is not None:
        block -= centre
    scale = 1 / np.maximum(np.sqrt(np.einsum("ij,ij->i", block, block)), 1e-12)  # no squared copy
    block *= scale[:, None]
    return block, scale
