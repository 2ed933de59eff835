"""Descriptive statistics for the notebooks: prompts, images, embeddings and errors."""

import hashlib
import itertools
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .synth import FAMILIES, parse_prompt

ATTRIBUTES_FILE = "attributes.csv"


def prompt_lengths(prompts) -> pd.DataFrame:
    """Words and characters per prompt."""
    prompts = [str(p) for p in prompts]
    return pd.DataFrame({"words": [len(p.split()) for p in prompts],
                         "characters": [len(p) for p in prompts]})


def quantile_bins(values, q=4) -> pd.Series:
    """Integer ``values`` in (at most) ``q`` quantile bins, each labelled with the range of
    its members, like "12–14"."""
    values = pd.Series(values).astype(int)
    bins = pd.qcut(values, q=q, duplicates="drop").cat.remove_unused_categories()
    ranges = values.groupby(bins, observed=True).agg(["min", "max"])
    labels = {interval: f"{low}–{high}" if low != high else f"{low}"
              for interval, (low, high) in ranges.iterrows()}
    return bins.cat.rename_categories(labels)


def word_frequencies(prompts, top=25) -> pd.Series:
    """The ``top`` most frequent lower-cased words over all prompts."""
    counts = Counter(word for p in prompts for word in re.findall(r"[a-z0-9']+", str(p).lower()))
    return pd.Series(dict(counts.most_common(top)), name="count")


def duplicates(dataset) -> dict:
    """How many prompts repeat, and how many image files are byte-identical to another."""
    per_prompt = pd.Series(dataset.prompts).value_counts()
    digests = Counter(hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in dataset.paths)
    return {
        "images": len(dataset),
        "distinct_prompts": int(len(per_prompt)),
        "images_sharing_a_prompt": int(per_prompt[per_prompt > 1].sum()),
        "most_images_per_prompt": int(per_prompt.max()) if len(per_prompt) else 0,
        "duplicate_image_files": int(sum(n - 1 for n in digests.values() if n > 1)),
    }


def image_properties(paths) -> pd.DataFrame:
    """Width, height, mode and format of each image, read from its header only."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            rows.append({"width": image.width, "height": image.height, "mode": image.mode,
                         "format": image.format})
    return pd.DataFrame(rows)


def load_attributes(data_dir, ids):
    """The generated dataset's ``attributes.csv`` rows in the order of ``ids``; None for
    datasets without one (real images)."""
    path = Path(data_dir) / ATTRIBUTES_FILE
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False).set_index("imgId")
    return table.reindex(list(ids))[list(FAMILIES)].reset_index(drop=True)


def project_2d(points) -> np.ndarray:
    """The first two principal components of the rows of ``points``."""
    centred = np.asarray(points, dtype=np.float64) - np.mean(points, axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


def attribute_matches(true_prompts, predicted_prompts) -> pd.DataFrame:
    """Per image and attribute family: does the predicted prompt state the true value?"""
    rows = []
    for truth, predicted in zip(true_prompts, predicted_prompts):
        want, got = parse_prompt(truth), parse_prompt(predicted)
        rows.append({family: want[family] is not None and want[family] == got[family]
                     for family in FAMILIES})
    return pd.DataFrame(rows, columns=list(FAMILIES))


def unseen_pairs(train_attributes: pd.DataFrame, test_attributes: pd.DataFrame) -> np.ndarray:
    """For each test row, how many pairs of attribute values (e.g. colour=red with
    shape=star) never occur together in a training image."""
    pairs = list(itertools.combinations(FAMILIES, 2))
    seen = {pair: set(zip(train_attributes[pair[0]], train_attributes[pair[1]])) for pair in pairs}
    counts = np.zeros(len(test_attributes), dtype=int)
    for pair in pairs:
        combos = zip(test_attributes[pair[0]], test_attributes[pair[1]])
        counts += np.array([combo not in seen[pair] for combo in combos], dtype=int)
    return counts
