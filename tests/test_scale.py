"""Flat cost per image: evaluation works in blocks of bounded size, whatever the number of
test images and the size of the bank, and a stage reads only the embeddings it uses
(issue 12)."""

import dataclasses
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from img2prompt.evaluation import scores, search


def test_nearest_in_blocks_finds_what_the_whole_matrix_finds(monkeypatch):
    rng = np.random.default_rng(0)
    queries, bank = rng.normal(size=(50, 8)), rng.normal(size=(70, 8))
    whole = np.argmax(scores.unit_rows(queries) @ scores.unit_rows(bank).T, axis=1)
    monkeypatch.setattr(search, "SIMILARITY_BLOCK", 150)  # two queries at a time
    assert np.array_equal(search.nearest(queries, bank), whole)


def test_nearest_of_centred_rows_in_blocks_finds_what_the_whole_matrix_finds(monkeypatch):
    rng = np.random.default_rng(5)
    queries, bank = rng.normal(size=(50, 8)) + 3, rng.normal(size=(70, 8)) + 3
    centre = bank.mean(axis=0)
    whole = np.argmax(scores.unit_rows(queries - centre) @ scores.unit_rows(bank - centre).T, axis=1)
    monkeypatch.setattr(search, "QUERY_BLOCK", 16)
    monkeypatch.setattr(search, "SIMILARITY_BLOCK", 16 * 9)  # 9 bank rows at a time
    assert np.array_equal(search.nearest(queries, bank, centre), whole)


def test_nearest_never_copies_the_whole_bank(monkeypatch):
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(200_000, 64)).astype(np.float32)  # 51 MB
    monkeypatch.setattr(search, "SIMILARITY_BLOCK", 1 << 20)  # 4 MB of similarities at once
    tracemalloc.start()
    search.nearest(bank[:500], bank, bank.mean(axis=0))  # kNN: both sides centred on the bank's mean
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < bank.nbytes / 4, f"peak {peak / 1e6:.0f} MB for a bank of {bank.nbytes / 1e6:.0f} MB"


def clustered(n, dims=32, clusters=60, seed=0, spread=0.6):
    """Rows around ``clusters`` centres, all positive-shifted (as CNN features are)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(clusters, dims))
    return (centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dims)) + 3).astype(np.float32)


def test_approximate_search_finds_the_exact_neighbour_of_nearly_every_query_and_says_how_often(monkeypatch):
    bank, queries = clustered(6000, spread=1.0), clustered(1500, seed=1, spread=1.0)  # close clusters: some misses
    centre = bank.mean(axis=0)
    exact = search.nearest(queries, bank, centre)
    found, report = search.search(queries, bank, centre, "approximate")
    assert report["search"] == "approximate" and report["probes"] == search.PROBES
    assert report["recall_checked"] == search.RECALL_SAMPLE
    recall = np.mean(found == exact)
    assert 0.95 < recall < 1  # nearly every query (and the test can tell a miss)
    again, _ = search.search(queries, bank, centre, "approximate")
    assert np.array_equal(again, found)  # seeded: the same answer each time
    monkeypatch.setattr(search, "RECALL_SAMPLE", len(queries))  # every query checked: the recall itself
    assert search.search(queries, bank, centre, "approximate")[1]["recall_at_1"] == recall


@pytest.mark.parametrize("method", ["exact", "approximate"])
def test_queries_searched_a_block_at_a_time_find_what_all_at_once_find(method):
    bank, queries = clustered(6000, spread=1.0), clustered(1500, seed=1, spread=1.0)
    centre = bank.mean(axis=0)
    whole, report = search.search(queries, bank, centre, method)
    finder = search.NeighbourSearch(bank, len(queries), centre, method)
    blocks = [finder.nearest(queries[start:start + 400]) for start in range(0, len(queries), 400)]
    assert np.array_equal(np.concatenate(blocks), whole) and finder.report() == report


def test_auto_search_is_exact_up_to_its_threshold_and_approximate_beyond(monkeypatch):
    bank, queries = clustered(3000), clustered(300, seed=1)
    monkeypatch.setattr(search, "APPROXIMATE_ABOVE", 3000)
    found, report = search.search(queries, bank)
    assert report == {"search": "exact"} and np.array_equal(found, search.nearest(queries, bank))
    monkeypatch.setattr(search, "APPROXIMATE_ABOVE", 2999)
    assert search.search(queries, bank)[1]["search"] == "approximate"
    with pytest.raises(ValueError, match="exact"):
        search.search(queries, bank, method="fast")


def test_approximate_search_is_a_faiss_inverted_file_of_about_root_bank_groups():
    import faiss
    bank = clustered(10_000)
    finder = search.NeighbourSearch(bank, 100, bank.mean(axis=0), "approximate")
    assert isinstance(finder.index, faiss.IndexIVFFlat) and finder.index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert finder.index.nlist == 100 and finder.index.nprobe == search.PROBES and finder.index.ntotal == len(bank)


def test_evaluate_says_which_search_found_the_neighbours(trained_run, tmp_path, capsys):
    import json
    import shutil

    from img2prompt.cli import main
    from img2prompt.run import Run
    copy = tmp_path / "run"
    shutil.copytree(trained_run["run"], copy)
    exact = json.loads((copy / "metrics.json").read_text())["methods"]
    assert exact["knn"]["search"] == exact["retrieval"]["search"] == {"search": "exact"}  # auto, a small bank
    assert main(["evaluate", "--run", str(copy), "--search", "approximate", "--quiet"]) == 0
    assert "knn: approximate nearest neighbours" in capsys.readouterr().out
    approximate = json.loads((copy / "metrics.json").read_text())["methods"]
    for method in ("knn", "retrieval"):
        report = approximate[method]["search"]
        assert report["search"] == "approximate" and 0 <= report["recall_at_1"] <= 1
        assert report["recall_checked"] == approximate[method]["n"]  # fewer test images than the sample
    assert approximate["mapper"]["mean_cosine"] == exact["mapper"]["mean_cosine"]
    assert Run.open(copy).config.search == "auto"  # --search holds for that evaluation only


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
        search.nearest(bank[:2000], bank)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 120e6, f"{measure}: peak {peak / 1e6:.0f} MB"


def test_the_decoder_input_is_read_only_by_the_stages_that_use_it(trained_run):
    from img2prompt.run import Run
    run = Run.open(trained_run["run"])  # the default decoder input: pooled, grid of both maps, colours
    data = run.data(progress=False)  # what the mapper's training and evaluation read
    assert data.image_emb.shape[1] == 1280 and "decoder_emb" not in vars(data)  # not read yet
    np.testing.assert_array_equal(data.decoder_emb[:, :1280], data.image_emb)  # read now, whole
    assert data.decoder_emb.shape[1] == run.image_encoder().feature_dim(3, 4, "both")


def test_a_runs_data_holds_each_split_as_one_slice_read_in_place(trained_run):
    from img2prompt.data.dataset import load_dataset
    from img2prompt.encoders.embeddings import dataset_embeddings
    from img2prompt.run import Run
    run = Run.open(trained_run["run"])
    data = run.data(progress=False)
    assert list(data.splits) == sorted(data.splits, key=["train", "val", "test"].index)
    dataset = load_dataset(run.config.data_dir)
    splits = run.splits(dataset)
    for split in ("train", "val", "test"):
        part = data.part(split)
        assert part["ids"] == [i for i, s in zip(dataset.ids, splits) if s == split]  # as the dataset orders them
        for name in ("image_emb", "target_emb", "metric_emb", "decoder_emb"):
            assert np.shares_memory(part[name], getattr(data, name)), (split, name)  # a view, not a copy
    # the numbers of the cache entries read whole, in the dataset's order
    whole = dataset_embeddings(run.config, dataset, progress=False, log=lambda _: None)
    rows = [dataset.ids.index(i) for i in data.dataset.ids]
    for name in ("image_emb", "target_emb", "metric_emb"):
        np.testing.assert_array_equal(getattr(data, name), getattr(whole, name)[rows])
    np.testing.assert_array_equal(data.decoder_emb, whole.load_decoder_emb()[rows])


def test_some_columns_of_a_cache_entry_are_read_without_the_others(tmp_path):
    from img2prompt.encoders.embeddings import EmbeddingCache
    array = np.random.default_rng(0).random((4000, 4000), dtype=np.float32)  # 64 MB
    EmbeddingCache(tmp_path).save("image", {"test": 1}, array)
    np.testing.assert_array_equal(EmbeddingCache(tmp_path).load("image", {"test": 1}, slice(0, 400)),
                                  array[:, :400])
    rows = np.r_[3999:2000:-1, 7, 0]  # some rows, in an order of their own
    np.testing.assert_array_equal(EmbeddingCache(tmp_path).load("image", {"test": 1}, slice(0, 400), rows),
                                  array[rows, :400])
    # in a process of its own, whose peak resident memory (VmHWM) is the measure
    script = f"""
import re
from img2prompt.encoders.embeddings import EmbeddingCache
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
before = peak()
EmbeddingCache({str(tmp_path)!r}).load("image", {{"test": 1}}, slice(0, 400), list(range(3999, -1, -1)))
print(peak() - before)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 16e6  # the 6.4 MB asked for (rows in reverse) and a block of rows, not 64 MB


@pytest.fixture
def dataset_with_unreadable_images(small_dataset, tmp_path):
    """The small dataset with one image cut short (its header reads, its pixels do not) and
    one that is text: a bad image found only by decoding it, and one found by its header."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(small_dataset, root)
    cut = root / "images" / "synth_000003.png"
    cut.write_bytes(cut.read_bytes()[:-200])
    (root / "images" / "synth_000007.png").write_text("not an image\n")
    return root


def count_decodes(monkeypatch):
    """{file: how many times its pixels were decoded} (a PIL image whose tiles are still
    to be read is decoded by ``load``)."""
    from PIL import ImageFile
    decoded, real_load = {}, ImageFile.ImageFile.load

    def counting_load(image):
        if image.tile:
            decoded[Path(image.filename).name] = decoded.get(Path(image.filename).name, 0) + 1
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return decoded


def test_with_skip_each_image_is_decoded_once_and_the_bad_ones_are_recorded_while_embedding(
        dataset_with_unreadable_images, tmp_path, monkeypatch):
    import pandas as pd

    from img2prompt import Run, StudyConfig
    decoded = count_decodes(monkeypatch)
    config = StudyConfig(data_dir=str(dataset_with_unreadable_images), run_dir=str(tmp_path / "run"),
                         cache_dir=str(tmp_path / "cache"), on_error="skip", num_workers=0)
    run = Run.create(config)
    data = run.data(progress=False)
    assert decoded and max(decoded.values()) == 1, decoded  # no separate checking pass
    assert "synth_000003.png" in decoded  # the cut image was found by decoding it, while embedding
    assert {"synth_000003", "synth_000007"}.isdisjoint(data.dataset.ids) and len(data.dataset) == 22
    assert len(data.splits) == len(data.image_emb) == len(data.target_emb) == len(data.decoder_emb) == 22
    rejects = pd.read_csv(run.root / "rejects.csv")
    assert rejects["item"].str.endswith("synth_000003.png").sum() == 1
    assert rejects["item"].str.endswith("synth_000007.png").sum() == 1

    decoded.clear()  # a second run on the same data: from the cache, nothing decoded, same rejects
    again = Run.create(dataclasses.replace(config, run_dir=str(tmp_path / "again"))).data(progress=False)
    assert not decoded and again.dataset.ids == data.dataset.ids
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "rejects.csv"), rejects)


def test_nearest_holds_a_bounded_block_of_a_wide_bank_when_the_queries_are_few(monkeypatch):
    # 100 queries against 40,000 rows of 256 numbers: a block of bank rows as wide as the
    # similarities allow (10,485 rows) would be normalised in copies of 11 MB each
    bank = np.random.default_rng(7).normal(size=(40_000, 256)).astype(np.float32)
    monkeypatch.setattr(search, "SIMILARITY_BLOCK", 1 << 20)  # 4 MB of float32 per block
    tracemalloc.start()
    search.nearest(bank[:100], bank, bank.mean(axis=0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * (1 << 20) * 4, f"peak {peak / 1e6:.1f} MB"  # a block each: queries, bank rows, similarities


def test_cosines_of_many_rows_are_computed_a_block_at_a_time():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(60_000, 128)).astype(np.float32), rng.normal(size=(60_000, 128)).astype(np.float32)
    picked = search.Rows(b, rng.permutation(len(b)))  # read in place, as the retrieved prompts are
    tracemalloc.start()
    cosines = scores.cosine_rows(a, picked)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = np.sum(scores.unit_rows(a) * scores.unit_rows(b[picked.rows]), axis=1)
    np.testing.assert_allclose(cosines, whole, atol=1e-6)
    np.testing.assert_allclose(scores.cosine_rows(a, b[0]), scores.unit_rows(a) @ scores.unit_rows(b[0])[0], atol=1e-6)
    assert peak < a.nbytes / 4, f"peak {peak / 1e6:.1f} MB for rows of {a.nbytes / 1e6:.0f} MB"


def test_a_dataset_listing_holds_little_beyond_its_text(tmp_path):
    from img2prompt.data.dataset import load_dataset
    from tests.test_data import make_dataset
    n = 3000
    root = make_dataset(tmp_path, ["imgId,prompt", *(f"image_{i:05d},a prompt {i}" for i in range(n))], ["x.png"])
    png = (root / "images" / "x.png").read_bytes()
    (root / "images" / "x.png").unlink()
    for i in range(n):
        (root / "images" / f"image_{i:05d}.png").write_bytes(png)
    tracemalloc.start()
    dataset = load_dataset(root)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert dataset.paths[7] == root / "images" / "image_00007.png" and len(dataset.paths) == n
    # its ids, prompts and file names as Python strings in lists (about 57 bytes each beyond its
    # text): no Path per file (about 500 bytes with its parts), no copy of the listing kept
    text = sum(len(s.encode()) for column in (dataset.ids, dataset.prompts, dataset.files) for s in column)
    assert (held - text) / n < 250, f"{(held - text) / n:.0f} bytes per image beyond its text"


def test_training_reads_no_second_copy_of_data_already_loaded(trained_run, tmp_path, monkeypatch):
    import shutil

    from img2prompt.encoders import embeddings
    from img2prompt.run import Run
    copy = tmp_path / "run"
    shutil.copytree(trained_run["run"], copy)
    run = Run.open(copy)
    run.update(max_epochs=1)
    data = run.data(progress=False)  # a notebook holds it while it trains
    reads = []
    original = embeddings.dataset_embeddings
    monkeypatch.setattr(embeddings, "dataset_embeddings", lambda *a, **k: reads.append(1) or original(*a, **k))
    run.train(progress=False)
    assert reads == [] and run.data(progress=False) is data


def test_some_rows_of_an_array_are_saved_without_a_copy_of_them(tmp_path):
    from img2prompt.storage.checkpoints import load_tensors, save_tensors
    array = np.random.default_rng(9).random((100_000, 128), dtype=np.float32)  # 51 MB
    rows = np.arange(0, len(array), 2)[::-1]  # the bank: some rows, in an order of their own
    tracemalloc.start()
    save_tensors(tmp_path / "bank.safetensors", {"target_emb": search.Rows(array, rows)}, {"prompts": ["x"]})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tensors, metadata = load_tensors(tmp_path / "bank.safetensors", "bank", "", framework="numpy")
    np.testing.assert_array_equal(tensors["target_emb"], array[rows])
    assert metadata["prompts"] == ["x"] and set(metadata) == {"prompts", "crc32"}
    assert peak < array[rows].nbytes / 4, f"peak {peak / 1e6:.1f} MB"
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)  # written little-endian, as safetensors does
    save_tensors(tmp_path / "b.safetensors", {"b": big_endian}, {})
    np.testing.assert_array_equal(load_tensors(tmp_path / "b.safetensors", "", "", framework="numpy")[0]["b"],
                                  big_endian)


def test_counting_truncated_prompts_loads_the_tokenizer_only():
    from img2prompt.encoders.text import metric_encoder
    encoder = metric_encoder()
    assert encoder.count_truncated(["a red circle", "word " * 600]) == 1
    assert encoder._model is None  # the weights are not read to count tokens


def test_reading_cached_embeddings_loads_no_image_model(trained_run, monkeypatch):
    from img2prompt.encoders.image import ImageEncoder
    from img2prompt.run import Run

    def must_not_load(self):
        raise AssertionError("the image model was loaded to read cached embeddings")

    monkeypatch.setattr(ImageEncoder, "model", property(must_not_load))
    data = Run.open(trained_run["run"]).data(progress=False)  # train and evaluate read this
    assert data.image_emb.shape[1] == 1280
