"""Descriptive statistics for the notebooks: prompts, images, embeddings and errors."""

import hashlib
import itertools
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from img2prompt.data.synth import FAMILIES, parse_prompt

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


def sample_rows(n, at_most, seed=0) -> np.ndarray:
    """Indices of at most ``at_most`` of ``n`` rows, drawn with ``seed``, in order: what a
    figure or table shows of a large dataset (all rows when there are few)."""
    if n <= at_most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=at_most, replace=False))


def image_properties(paths) -> pd.DataFrame:
    """Width, height, mode and format of each image, read from its header only."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            rows.append({"width": image.width, "height": image.height, "mode": image.mode,
                         "format": image.format})
    return pd.DataFrame(rows)


ATTRIBUTE_BLOCK = 10_000  # attributes.csv rows read at once


def has_attributes(data_dir) -> bool:
    """Whether a dataset was generated: its ``attributes.csv`` says what each image shows."""
    return (Path(data_dir) / ATTRIBUTES_FILE).is_file()


def load_attributes(data_dir, ids):
    """The generated dataset's ``attributes.csv`` rows in the order of ``ids``; None for
    datasets without one (real images)."""
    if not has_attributes(data_dir):
        return None
    path = Path(data_dir) / ATTRIBUTES_FILE
    wanted = set(ids)
    # a block of rows at a time, keeping those of ``ids``: memory follows them, not the file
    # (a set lookup per row: pandas' isin converts the set again for every block, 4x slower)
    blocks = [block[[img_id in wanted for img_id in block["imgId"]]] for block in
              pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=ATTRIBUTE_BLOCK)]
    table = pd.concat(blocks) if blocks else pd.DataFrame(columns=["imgId", *FAMILIES])
    return table.set_index("imgId").reindex(list(ids))[list(FAMILIES)].reset_index(drop=True)


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


def unseen_pair_groups(train_attributes: pd.DataFrame, test_attributes: pd.DataFrame) -> pd.Series:
    """For each test row, how many attribute pairs are unseen in training, as the groups
    "0", "1", "2" and "3+" (few test images have more)."""
    unseen = unseen_pairs(train_attributes, test_attributes)
    return pd.Series(np.where(unseen >= 3, "3+", np.minimum(unseen, 3).astype(str)), name="unseen attribute pairs")


def linear_probe(data, preview=8) -> dict:
    """How much of the prompt a ridge map from image to prompt embeddings recovers, fitted on
    the training images (``data`` is a run's StudyData): the mean cosine with the true test
    prompts (target space), and a preview on ``preview`` test images with distinct prompts —
    the mapped-image / prompt similarity matrix and how many match their own prompt best."""
    from img2prompt.data.dataset import unique_prompts
    from img2prompt.evaluation.scores import cosine_rows, fit_linear_map, unit_rows

    train, test = data.splits == "train", np.flatnonzero(data.splits == "test")
    to_text = fit_linear_map(data.image_emb[train], data.target_emb[train])
    test_cosine = float(cosine_rows(to_text(data.image_emb[test]), data.target_emb[test]).mean())
    _, distinct = unique_prompts([data.dataset.prompts[i] for i in test])
    chosen = test[distinct[:preview]]
    similarity = unit_rows(data.target_emb[chosen]) @ unit_rows(to_text(data.image_emb[chosen])).T
    return {"test_cosine": test_cosine, "similarity": similarity,
            "prompts": [data.dataset.prompts[i] for i in chosen], "ids": [data.dataset.ids[i] for i in chosen],
            "own_prompt_best": int((similarity.argmax(axis=0) == np.arange(len(chosen))).sum())}


def compare_strategies(decoder, image_emb, metric_emb, config, strategies=("greedy", "beam", "sample")) -> pd.DataFrame:
    """Each decoding strategy on the same images: mean cosine of the generated prompts to
    the true ones (``metric_emb``), prompts per second and diversity. One row per strategy."""
    import time

    from img2prompt.encoders.embeddings import text_embeddings
    from img2prompt.encoders.text import metric_encoder
    from img2prompt.evaluation.scores import cosine_rows, distinct_ngrams

    metric, rows = metric_encoder(), {}
    for strategy in strategies:
        started = time.perf_counter()
        texts = decoder.generate(image_emb, config.decode_options(strategy))
        seconds = time.perf_counter() - started
        cosine = cosine_rows(text_embeddings(texts, metric, progress=False), metric_emb)
        rows[strategy] = {"mean cosine": float(cosine.mean()), "prompts/s": len(texts) / seconds,
                          **distinct_ngrams(texts)}
    return pd.DataFrame(rows).T


def compare_decoder_inputs(run, progress=None, log=print) -> pd.DataFrame:
    """The run's decoder against one trained the same way on the pooled vector alone (or,
    when the run's decoder reads only that, on the default grid and colours): per input,
    its training, and on the test split its greedy prompts' mean cosine, exact-prompt rate
    and the attribute families it names right (generated data). Nothing is saved."""
    import dataclasses

    from img2prompt.config import StudyConfig
    from img2prompt.encoders.embeddings import text_embeddings
    from img2prompt.encoders.text import metric_encoder
    from img2prompt.evaluation.scores import cosine_rows, exact_prompt_rate
    from img2prompt.models.decoder import describe_input
    from img2prompt.models.training import train_study_decoder

    own = (run.config.decoder_grid, run.config.decoder_colors, run.config.decoder_map)
    default = (StudyConfig.decoder_grid, StudyConfig.decoder_colors, StudyConfig.decoder_map)
    rows = {}
    for grid, colors, grid_map in ((0, 0, own[2]), own if own[:2] != (0, 0) else default):
        config = dataclasses.replace(run.config, decoder_grid=grid, decoder_colors=colors, decoder_map=grid_map)
        if (grid, colors, grid_map) == own:
            decoder, summary, data = run.decoder().to(run.device), run.summary("decoder"), run.data(progress, log)
        else:
            data = run.prepare(config, progress, log)
            decoder, summary, _ = train_study_decoder(data, config, run.device, progress, log)
        test = data.part("test")
        texts = decoder.generate(test["decoder_emb"], config.decode_options("greedy"))
        cosine = cosine_rows(text_embeddings(texts, metric_encoder(config.device), progress=False), test["metric_emb"])
        name = describe_input(grid, colors, grid_map)
        rows[name] = {"test cosine (greedy)": float(cosine.mean()), "exact prompts": exact_prompt_rate(texts, test["prompts"]),
                      "val cosine": summary["val_cosine"], "epochs": summary["epochs"], "seconds": summary["seconds"],
                      "input width": data.decoder_emb.shape[1]}
        if has_attributes(config.data_dir):
            rows[name].update(attribute_matches(test["prompts"], texts).mean().to_dict())
    return pd.DataFrame(rows).T
