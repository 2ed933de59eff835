"""A run's evaluation: every method on the test split, scored in the one metric space.

``evaluate_run`` gathers what ``scores.evaluate_methods`` compares: the prompt bank (each
distinct prompt once), the training images for kNN, the mapper's predictions, the
decoder's text once the run has a decoder; after fine-tuning, the same methods on the
frozen features, paired; on generated data, which attributes each text method states.
"""

import numpy as np

from img2prompt.data.dataset import unique_prompts
from img2prompt.errors import RunError
from img2prompt.evaluation.familiarity import FLAG_BELOW
from img2prompt.evaluation.scores import (
    evaluate_methods,
    fit_linear_map,
    paired_difference,
)
from img2prompt.evaluation.search import Rows


def evaluate_run(run, data, config, progress=None, log=print):
    """(per-image DataFrame, metrics dict) of ``run`` on ``data`` (its StudyData) with the
    evaluation settings of ``config`` (bank, search, bootstrap, decoding)."""
    from img2prompt.encoders.text import METRIC_ENCODER

    test, train = data.part("test"), data.part("train")
    if not test["ids"]:
        raise RunError(f"{run.root}: the test split is empty; train with --test-fraction > 0.")
    bank = prompt_bank(data, config.bank)
    # the training prompts are read for kNN's answers only: in place, not a column of their own
    train_texts = {"prompts": Rows(data.dataset.prompts, np.flatnonzero(data.splits == "train")),
                   **{name: train[name] for name in ("image_emb", "metric_emb")}}
    to_metric = (None if config.text_encoder == METRIC_ENCODER
                 else fit_linear_map(train["target_emb"], train["metric_emb"]))
    generated = decoder_text(run, test, config, progress, log)
    frame, scores = evaluate_methods(test, train_texts, bank, mapper_blocks(run.mapper(), test), to_metric,
                                     config.bootstrap, config.seed, generated, config.search)
    text_columns = {"retrieval": "predicted_prompt", **{name: f"{name}_prompt" for name in generated}}
    if run.is_finished("tune"):
        compare_with_frozen(run, config, bank, to_metric, frame, scores, progress, log)
        text_columns["frozen_retrieval"] = "frozen_predicted_prompt"
    attribute_accuracy(config.data_dir, test["prompts"], frame, text_columns, scores)
    familiarity = run.familiarity()
    if familiarity is not None:  # the test images did not set the threshold: how many it flags
        frame["familiarity"] = familiarity.percentile(test["image_emb"])
        scores["familiarity"] = {"flag_below": FLAG_BELOW, "test_flagged": float((frame["familiarity"] < FLAG_BELOW).mean())}
    metrics = {"run_dir": str(run.root), "data_dir": config.data_dir, "n_test": len(test["ids"]),
               "n_train": len(train["ids"]), "image_encoder": config.image_encoder,
               "tune": "encoder" if run.is_finished("tune") else "head", "text_encoder": config.text_encoder,
               "metric_encoder": "all-MiniLM-L6-v2", "bank": config.bank, **scores}
    return frame, metrics


def prompt_bank(data, bank="train") -> dict:
    """The prompts retrieval answers with (those of the training images, or of ``all``),
    each distinct prompt once, read in place: their texts, target and metric embeddings."""
    rows = np.flatnonzero(np.ones(len(data.splits), bool) if bank == "all" else data.splits == "train")
    rows = rows[unique_prompts(Rows(data.dataset.prompts, rows))[1]]
    return {name: Rows(array, rows) for name, array in (
        ("prompts", data.dataset.prompts), ("target_emb", data.target_emb), ("metric_emb", data.metric_emb))}


def mapper_blocks(mapper, test):
    """The mapper's predictions for a slice of ``test``'s rows, as ``evaluate_methods`` asks
    for them a block at a time."""
    return lambda rows: mapper.predict(test["image_emb"][rows]).cpu().numpy()


def decoder_text(run, test, config, progress, log) -> dict:
    """{"decoder": (its prompts for the test images, their metric embeddings)} once the run
    has a decoder, else {}."""
    from img2prompt.encoders.embeddings import text_embeddings
    from img2prompt.encoders.text import metric_encoder

    if not run.is_finished("decoder"):
        return {}
    texts = run.decoder().to(run.device).generate(test["decoder_emb"], config.decode_options())
    log(f"decoder: {len(texts)} prompts generated ({config.decode_strategy})")
    return {"decoder": (texts, text_embeddings(texts, metric_encoder(config.device), progress=progress))}


def compare_with_frozen(run, config, bank, to_metric, frame, scores, progress, log):
    """After fine-tuning: the mapper and retrieval on the frozen encoder's features too, their
    cosines beside the tuned ones and the paired differences (added to ``frame`` and ``scores``)."""
    frozen = run.prepare(config, progress, log, tuned=False)
    test = frozen.part("test")
    frozen_frame, frozen_scores = evaluate_methods(test, frozen.part("train"), bank, mapper_blocks(run.frozen_mapper(), test),
                                                   to_metric, config.bootstrap, config.seed,
                                                   search_method=config.search)
    for name in ("mapper", "retrieval"):
        scores["methods"][f"frozen_{name}"] = frozen_scores["methods"][name]
        frame[f"cosine_frozen_{name}"] = frozen_frame[f"cosine_{name}"]
        scores["comparisons"][f"{name}_minus_frozen_{name}"] = paired_difference(
            frame[f"cosine_{name}"].to_numpy(), frozen_frame[f"cosine_{name}"].to_numpy(), config.bootstrap,
            config.seed)
    frame["frozen_predicted_prompt"] = frozen_frame["predicted_prompt"]


def attribute_accuracy(data_dir, prompts, frame, text_columns, scores):
    """On generated data: for each text method (``text_columns``: method -> its column of
    ``frame``), the share of test images whose attributes its text states rightly."""
    from img2prompt.evaluation.analysis import attribute_matches, has_attributes
    if has_attributes(data_dir):
        for name, column in text_columns.items():
            accuracy = attribute_matches(prompts, frame[column]).mean()
            scores["methods"][name]["attribute_accuracy"] = accuracy.round(6).to_dict()
