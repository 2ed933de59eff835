"""Scoring every method in one metric space (all-MiniLM-L6-v2 cosine), with baselines.

Methods, each giving a per-test-image cosine to the true prompt's metric embedding:
- ``mapper``: the predicted embedding itself (translated to the metric space by a ridge
  map fitted on training prompts when the target encoder is not MiniLM);
- ``retrieval``: the metric embedding of the bank prompt nearest to the prediction;
- ``knn``: the prompt of the nearest training image (image-embedding cosine);
- ``mean_prompt``: the constant mean training prompt embedding.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from img2prompt.data.dataset import normalize_prompt
from img2prompt.evaluation.search import (
    QUERY_BLOCK,
    NeighbourSearch,
    Rows,
    search,
    unit_rows,
)

if TYPE_CHECKING:  # pandas loads where it is used: prediction needs none
    import pandas

METHODS = ("mapper", "retrieval", "knn", "mean_prompt")
BOOTSTRAP_BLOCK = 1 << 18   # resampled indices drawn at once (2 MB)


def cosine_rows(a, b) -> np.ndarray:
    """Cosine between row i of ``a`` and row i of ``b`` (either may be one row, compared with
    every row of the other, or ``search.Rows``), a block of rows at a time: no normalised copy
    of the whole of either is made."""
    one_row = [getattr(x, "ndim", 2) == 1 for x in (a, b)]

    def block(x, single, start):
        return x if single else x[start:start + QUERY_BLOCK]

    rows = len(b if one_row[0] else a)
    return np.concatenate([np.sum(unit_rows(block(a, one_row[0], s)) * unit_rows(block(b, one_row[1], s)), axis=1)
                           for s in range(0, rows, QUERY_BLOCK)] or [np.zeros(0, np.float32)])


def fit_linear_map(x, y, alpha=1.0):
    """Ridge regression y ≈ [x, 1] W; returns a function applying it."""
    x1 = np.hstack([x, np.ones((len(x), 1), dtype=x.dtype)]).astype(np.float64)
    w = np.linalg.solve(x1.T @ x1 + alpha * np.eye(x1.shape[1]), x1.T @ y)
    return lambda z: (np.hstack([z, np.ones((len(z), 1))]) @ w).astype(np.float32)


def summarize(scores, n_boot=1000, seed=0) -> dict:
    """Mean, median and bootstrap 95% interval of the mean."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = _bootstrap_interval(scores, n_boot, seed)
    return {"mean_cosine": float(scores.mean()), "median_cosine": float(np.median(scores)),
            "ci95": [low, high], "n": int(len(scores))}


def paired_difference(a, b, n_boot=1000, seed=0) -> dict:
    """Mean of a − b over the same images, with a paired bootstrap 95% interval."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    low, high = _bootstrap_interval(diff, n_boot, seed)
    return {"mean_difference": float(diff.mean()), "ci95": [low, high]}


def _bootstrap_interval(values, n_boot, seed):
    if len(values) == 0 or n_boot <= 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    # resamples drawn a block at a time (the same numbers as all at once): memory stays
    # bounded by BOOTSTRAP_BLOCK indices whatever the number of test images
    rows = max(1, BOOTSTRAP_BLOCK // len(values))
    means = np.concatenate([values[rng.integers(0, len(values), size=(min(rows, n_boot - done), len(values)))]
                            .mean(axis=1) for done in range(0, n_boot, rows)])
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def exact_prompt_rate(texts, prompts) -> float:
    exact = [normalize_prompt(t) == normalize_prompt(p) for t, p in zip(texts, prompts)]
    return float(np.mean(exact)) if exact else float("nan")


def distinct_ngrams(texts) -> dict:
    """Diversity of a set of generated texts: distinct n-grams over all n-grams (n = 1, 2),
    and distinct texts over texts. A model that writes one prompt for everything scores low."""
    result = {}
    for n in (1, 2):
        grams = [tuple(words[i:i + n]) for words in (normalize_prompt(t).split() for t in texts)
                 for i in range(len(words) - n + 1)]
        result[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    result["distinct_prompts"] = len({normalize_prompt(t) for t in texts}) / len(texts) if texts else 0.0
    return result


def evaluate_methods(test, train, bank, predicted, to_metric_space, n_boot=1000, seed=0,
                     generated=None, search_method="auto"):
    """Score every method on the test images.

    ``test`` and ``train`` are dicts with ``prompts``, ``image_emb`` and ``metric_emb`` (and
    ``test`` also ``ids``, ``images``, ``target_emb``); ``bank`` has ``prompts``,
    ``target_emb`` and ``metric_emb``; ``predicted`` are the mapper's target-space
    predictions, or a function giving those of a slice of the test rows (made a block at a
    time, never all at once); ``to_metric_space`` maps them into the metric space (None: the target
    space is the metric space); ``generated`` maps further method names (the decoder) to
    (texts, their metric-space embeddings); ``search_method`` (auto, exact, approximate) finds
    the nearest bank prompt and training image (``search.search``; its report is kept with
    each method's scores). Returns (per-image DataFrame, metrics dict).
    """
    import pandas as pd
    truth = test["metric_emb"]
    # the mapper's predictions a block of test images at a time: all of them at once are the
    # largest array of the evaluation (23 MB at 100,000 images)
    predict = predicted if callable(predicted) else lambda rows: predicted[rows.start:rows.stop]
    finder = NeighbourSearch(bank["target_emb"], len(truth), method=search_method, seed=seed)
    retrieved = np.zeros(len(truth), dtype=np.int64)
    mapper = np.zeros(len(truth), np.float32)
    native = None if to_metric_space is None else np.zeros(len(truth), np.float32)  # in the target space
    for start in range(0, len(truth), QUERY_BLOCK):
        rows = slice(start, min(start + QUERY_BLOCK, len(truth)))
        block = np.asarray(predict(rows), dtype=np.float32)
        retrieved[rows] = finder.nearest(block)
        mapper[rows] = cosine_rows(block if to_metric_space is None else to_metric_space(block), truth[rows])
        if native is not None:
            native[rows] = cosine_rows(block, test["target_emb"][rows])
    retrieval_search = finder.report()
    # kNN on image embeddings centred on the training mean: raw CNN features are all
    # positive, so uncentred cosines crowd together
    centre = train["image_emb"].mean(axis=0)
    neighbour, knn_search = search(test["image_emb"], train["image_emb"], centre, search_method, seed)
    mean_prompt = train["metric_emb"].mean(axis=0)

    scores = {
        "mapper": mapper,
        "retrieval": cosine_rows(Rows(bank["metric_emb"], retrieved), truth),  # gathered a block at a time
        "knn": cosine_rows(Rows(train["metric_emb"], neighbour), truth),
        "mean_prompt": cosine_rows(mean_prompt, truth),
    }
    frame = pd.DataFrame({
        "imgId": test["ids"], "image": test["images"], "prompt": test["prompts"],
        "predicted_prompt": [bank["prompts"][i] for i in retrieved],
        "knn_prompt": [train["prompts"][i] for i in neighbour],
        **{f"cosine_{name}": scores[name] for name in METHODS},
    })
    methods = {name: summarize(scores[name], n_boot, seed) for name in METHODS}
    if native is not None:
        frame["native_cosine_mapper"] = native
        methods["mapper"]["native_mean_cosine"] = float(native.mean())
    methods["retrieval"]["exact_prompt_rate"] = exact_prompt_rate(frame["predicted_prompt"], test["prompts"])
    methods["retrieval"]["bank_size"] = len(bank["prompts"])
    methods["retrieval"]["search"], methods["knn"]["search"] = retrieval_search, knn_search
    for name, (texts, embeddings) in (generated or {}).items():
        scores[name] = cosine_rows(embeddings, truth)
        frame[f"{name}_prompt"] = list(texts)
        frame[f"cosine_{name}"] = scores[name]
        methods[name] = {**summarize(scores[name], n_boot, seed),
                         "exact_prompt_rate": exact_prompt_rate(texts, test["prompts"]),
                         **distinct_ngrams(texts)}
    pairs = [(a, b) for a in ("mapper", "retrieval", *(generated or {})) for b in ("mean_prompt", "knn")]
    pairs += [(name, "retrieval") for name in (generated or {})]
    comparisons = {f"{a}_minus_{b}": paired_difference(scores[a], scores[b], n_boot, seed)
                   for a, b in pairs}
    result = {"methods": methods, "comparisons": comparisons}
    if generated:  # the diversity a generator should reach: that of the true prompts
        result["true_prompt_diversity"] = distinct_ngrams(test["prompts"])
    return frame, result


@dataclass(frozen=True)
class Comparison:
    """A paired difference between two methods on the same test images."""

    name: str  # "a_minus_b"
    mean_difference: float
    ci95: tuple

    @property
    def methods(self) -> tuple:
        return tuple(self.name.split("_minus_"))

    def verdict(self) -> str:
        """In words: "`a` beats `b` by +0.1234 (95% interval [...])"; a method beats another
        only when the whole interval is above zero."""
        low, high = self.ci95
        word = "beats" if low > 0 else ("loses to" if high < 0 else "does not clearly differ from")
        a, b = self.methods
        return (f"`{a}` {word} `{b}` by {self.mean_difference:+.4f} "
                f"(95% interval [{low:+.4f}, {high:+.4f}])")


@dataclass(frozen=True)
class Metrics:
    """A run's metrics (as saved by its evaluation), with typed access: ``metrics.method("decoder")["mean_cosine"]``,
    ``metrics.comparison("decoder_minus_knn").verdict()``, ``metrics.table()``."""

    data: dict

    def __getattr__(self, name):  # n_test, n_train, bank, image_encoder, text_encoder, ...
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def methods(self) -> dict:
        return self.data["methods"]

    def method(self, name) -> dict:
        return self.data["methods"][name]

    def comparison(self, name) -> Comparison:
        c = self.data["comparisons"][name]
        return Comparison(name, c["mean_difference"], tuple(c["ci95"]))

    def comparisons(self, method=None) -> list:
        """The paired differences (those of ``method`` only, when given)."""
        return [self.comparison(name) for name in self.data["comparisons"]
                if method is None or name.startswith(f"{method}_minus_")]

    def best(self) -> str:
        return max(self.methods, key=lambda name: self.methods[name]["mean_cosine"])

    def table(self) -> "pandas.DataFrame":
        """One row per method: mean, median and 95% interval, and for text methods the
        exact-prompt rate and diversity. The one rendering of the headline numbers."""
        rows = {}
        for name, m in self.methods.items():
            rows[name] = {"mean cosine": m["mean_cosine"], "median": m["median_cosine"],
                          "95% low": m["ci95"][0], "95% high": m["ci95"][1],
                          **{label: m.get(key) for key, label in TEXT_COLUMNS.items()}}
        import pandas as pd
        table = pd.DataFrame(rows).T
        return table.dropna(axis=1, how="all")

    def comparison_table(self, method=None) -> "pandas.DataFrame":
        import pandas as pd
        return pd.DataFrame({c.name.replace("_minus_", " − "): {
            "mean difference": c.mean_difference, "95% low": c.ci95[0], "95% high": c.ci95[1]}
            for c in self.comparisons(method)}).T

    def search_notes(self) -> list:
        """A line for each method whose nearest neighbours were searched approximately."""
        return [f"{name}: approximate nearest neighbours ({s['groups']:,} groups, {s['probes']} probed), the "
                f"exact one found for {s['recall_at_1']:.1%} of {s['recall_checked']:,} test images checked"
                for name in ("retrieval", "knn")
                if (s := self.method(name).get("search", {})).get("search") == "approximate"]

    def text(self) -> str:
        """The metrics as text, as the command line prints them."""
        header = (f"test images: {self.n_test}  (image encoder {self.image_encoder}, target "
                  f"{self.text_encoder}, scored with {self.metric_encoder}; retrieval bank: "
                  f"{self.bank}, {self.method('retrieval')['bank_size']} prompts)")
        return "\n".join([header, *self.search_notes(), self.table().to_string(float_format=lambda v: f"{v:.4f}", na_rep=""), "",
                          self.comparison_table().to_string(float_format=lambda v: f"{v:+.4f}")])


TEXT_COLUMNS = {"exact_prompt_rate": "exact prompt", "distinct_1": "distinct_1",
                "distinct_2": "distinct_2", "distinct_prompts": "distinct prompts"}
