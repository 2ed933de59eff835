"""Flat cost per image: evaluation works in blocks of bounded size, whatever the number of
test images and the size of the bank, and a stage reads only the embeddings it uses
(issue 12)."""

import tracemalloc

import numpy as np
import pytest

from img2prompt.evaluation import scores


def test_nearest_in_blocks_finds_what_the_whole_matrix_finds(monkeypatch):
    rng = np.random.default_rng(0)
    queries, bank = rng.normal(size=(50, 8)), rng.normal(size=(70, 8))
    whole = np.argmax(scores.unit_rows(queries) @ scores.unit_rows(bank).T, axis=1)
    monkeypatch.setattr(scores, "SIMILARITY_BLOCK", 150)  # two queries at a time
    assert np.array_equal(scores.nearest(queries, bank), whole)


def test_bootstrap_in_blocks_draws_the_same_resamples(monkeypatch):
    values = np.random.default_rng(1).random(300)
    whole = scores.summarize(values, n_boot=500, seed=3)
    monkeypatch.setattr(scores, "BOOTSTRAP_BLOCK", 300 * 7)  # 7 resamples at a time
    assert scores.summarize(values, n_boot=500, seed=3) == whole


@pytest.mark.parametrize("measure", ["bootstrap", "nearest"])
def test_evaluation_memory_stays_bounded_as_the_test_set_grows(measure):
    # 1,000 resamples of 20,000 test images: 160 MB of indices at once; 1,024 queries against
    # a bank of 40,000: 164 MB of cosines at once
    rng = np.random.default_rng(2)
    values, bank = rng.random(20_000), rng.normal(size=(40_000, 16)).astype(np.float32)
    tracemalloc.start()
    if measure == "bootstrap":
        scores.summarize(values, n_boot=1000)
    else:
        scores.nearest(bank[:2000], bank)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 120e6, f"{measure}: peak {peak / 1e6:.0f} MB"


def test_the_decoder_input_is_read_only_by_the_stages_that_use_it(trained_run):
    from img2prompt.encoders.embeddings import EmbeddingCache, image_embeddings
    from img2prompt.run import Run
    run = Run.open(trained_run["run"])  # the default decoder input: pooled, grid of both maps, colours
    data = run.data(progress=False)  # what the mapper's training and evaluation read
    assert data.image_emb.shape[1] == 1280 and "decoder_emb" not in vars(data)  # not read yet
    np.testing.assert_array_equal(data.decoder_emb[:, :1280], data.image_emb)  # read now, whole
    whole_rows = data.decoder_emb.nbytes
    assert whole_rows == len(data.image_emb) * run.image_encoder().feature_dim(3, 4, "both") * 4

    tracemalloc.start()  # the pooled columns come from the cache entry without its other columns
    pooled, info = image_embeddings(data.dataset, run.image_encoder(), EmbeddingCache(run.config.cache_dir),
                                    grid=3, colors=4, grid_map="both", columns=slice(0, 1280))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info["cached"] and peak < whole_rows / 4
    np.testing.assert_array_equal(pooled, data.image_emb)
