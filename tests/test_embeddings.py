import shutil

import numpy as np
import pytest
from PIL import Image

from img2prompt.data.dataset import load_dataset
from img2prompt.encoders import embeddings
from img2prompt.encoders.embeddings import (
    EmbeddingCache,
    extract_image_embeddings,
    image_embeddings,
    text_embeddings,
)
from img2prompt.encoders.image import image_encoder
from img2prompt.encoders.text import metric_encoder
from img2prompt.errors import DataError
from img2prompt.storage import checkpoints


@pytest.fixture(scope="module")
def encoder():
    return image_encoder("efficientnet-lite0")


def test_workers_and_batches_do_not_change_results(small_dataset, encoder):
    paths = load_dataset(small_dataset).paths
    in_process = extract_image_embeddings(paths, encoder, batch_size=5, num_workers=0, progress=False)
    with_workers = extract_image_embeddings(paths, encoder, batch_size=8, num_workers=2, progress=False)
    one_by_one = encoder.encode(paths[:3], batch_size=1)
    assert in_process.shape == (24, 1280)
    assert np.allclose(in_process, with_workers, atol=1e-4)
    assert np.allclose(in_process[:3], one_by_one, atol=1e-4)


def test_cache_is_reused_and_keyed_by_content(tmp_path, small_dataset, encoder, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    cache = EmbeddingCache(tmp_path / "cache")
    first, info = image_embeddings(load_dataset(data), encoder, cache, progress=False)
    assert not info["cached"] and len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("extraction ran although the cache holds the result")

    monkeypatch.setattr(embeddings, "feature_batches", must_not_run)
    again, info = image_embeddings(load_dataset(data), encoder, cache, progress=False)
    assert info["cached"] and np.array_equal(first, again)

    Image.new("RGB", (96, 96), (0, 255, 0)).save(sorted((data / "images").iterdir())[0])
    with pytest.raises(AssertionError, match="cache holds"):
        image_embeddings(load_dataset(data), encoder, cache, progress=False)  # content changed
    assert not list(data.rglob("*.safetensors")), "the cache must stay outside the dataset"


def test_interrupted_write_leaves_nothing_trusted(tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    key = {"k": 1}

    def crash(path, arrays, metadata):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_write_arrays", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.save("image", key, np.ones((2, 3)))
    assert cache.load("image", key) is None
    assert not list((tmp_path / "embeddings").iterdir())


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    cache = EmbeddingCache(tmp_path)
    texts = ["a red circle", "two blue stars"]
    first = text_embeddings(texts, metric_encoder(), cache, progress=False)
    [entry] = (tmp_path / "embeddings").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    recomputing = metric_encoder()
    again = text_embeddings(texts, recomputing, cache, progress=False)
    assert recomputing._model is not None, "the corrupt entry must be recomputed, not trusted"
    np.testing.assert_allclose(again, first, atol=1e-6)
    from_cache = metric_encoder()
    assert np.array_equal(text_embeddings(texts, from_cache, cache, progress=False), again)
    assert from_cache._model is None  # the entry was rewritten whole: a cache hit again


def test_text_embeddings_cached(tmp_path):
    cache = EmbeddingCache(tmp_path)
    first = text_embeddings(["a red circle", "two blue stars"], metric_encoder(), cache, progress=False)
    assert first.shape == (2, 384)
    fresh = metric_encoder()
    assert np.array_equal(first, text_embeddings(["a red circle", "two blue stars"], fresh, cache))
    assert fresh._model is None  # a cache hit loads no weights


def test_bad_image_is_named(tmp_path, small_dataset, encoder):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    victim = sorted((data / "images").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: the header still reads
    dataset = load_dataset(data)
    with pytest.raises(DataError, match=victim.name):
        image_embeddings(dataset, encoder, None, batch_size=4, num_workers=1, progress=False)
