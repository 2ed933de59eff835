"""Interrupted work resumes where it stopped: embedding extraction and mapper training."""

import numpy as np
import pandas as pd
import pytest

from img2prompt.cli import main
from img2prompt.config import StudyConfig
from img2prompt.data.dataset import load_dataset
from img2prompt.encoders import embeddings
from img2prompt.encoders.embeddings import EmbeddingCache, image_embeddings
from img2prompt.encoders.image import image_encoder
from img2prompt.errors import DataError
from img2prompt.models import training


def test_an_interrupted_extraction_resumes_from_the_saved_rows(small_dataset, tmp_path, monkeypatch):
    dataset = load_dataset(small_dataset)
    encoder = image_encoder("efficientnet-lite0")
    expected, _ = image_embeddings(dataset, encoder, progress=False)  # no cache: one pass
    monkeypatch.setattr(embeddings, "RESUME_CHUNK", 8)
    real_batches, seen = embeddings.feature_batches, []

    def interrupted_in_the_second_chunk(paths, *args, **kwargs):
        seen.append(list(paths))
        for indices, features in real_batches(paths, *args, **kwargs):
            if len(seen) == 1 and indices[0] >= 10:
                raise KeyboardInterrupt
            yield indices, features

    cache = EmbeddingCache(tmp_path / "cache")
    monkeypatch.setattr(embeddings, "feature_batches", interrupted_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        image_embeddings(dataset, encoder, cache, batch_size=5, progress=False)
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.part-*.safetensors"))) == 1

    array, info = image_embeddings(dataset, encoder, cache, batch_size=5, progress=False, resume=True)
    assert info["resumed_rows"] == 8 and seen[1] == dataset.paths[8:]  # only the rest was extracted
    np.testing.assert_allclose(array, expected, atol=1e-5)
    assert not list((tmp_path / "cache" / "embeddings").glob("*.part-*.safetensors"))


def test_an_interrupted_training_resumes_to_the_same_result(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(80, 16)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    y = np.tanh(x @ w)
    config = StudyConfig(hidden_size=32, depth=1, max_epochs=8, patience=50, batch_size=16)
    state = tmp_path / "training_state.pt"
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0)
    _, uninterrupted = training.train_mapper(x[:60], y[:60], x[60:], y[60:], config, progress=False)

    real_validation, calls = training.mapper_cosines, []

    def stop_in_epoch_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_validation(*args, **kwargs)

    monkeypatch.setattr(training, "mapper_cosines", stop_in_epoch_5)
    with pytest.raises(KeyboardInterrupt):
        training.train_mapper(x[:60], y[:60], x[60:], y[60:], config, progress=False, state_path=state)
    assert state.is_file()
    monkeypatch.setattr(training, "mapper_cosines", real_validation)
    model, resumed = training.train_mapper(x[:60], y[:60], x[60:], y[60:], config, progress=False,
                                           state_path=state, resume=True)
    columns = ["epoch", "train_loss", "val_loss", "best"]
    pd.testing.assert_frame_equal(resumed[columns], uninterrupted[columns])
    assert state.is_file()  # the run removes it only once the model it led to is saved


def test_resume_refuses_a_finished_run(trained_run, capsys):
    args = ["train", "--data", str(trained_run["data"]), "--out", str(trained_run["run"]), "--resume",
            "--quiet"]
    assert main(args) == 2
    assert "this run finished; nothing to resume" in capsys.readouterr().err


def test_images_found_unreadable_before_an_interruption_are_still_left_out_after_it(
        small_dataset, tmp_path, monkeypatch):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(small_dataset, root)
    dataset = load_dataset(root)
    dataset.paths[3].write_bytes(b"not an image")  # in the first shard
    dataset.paths[12].write_bytes(b"not an image either")  # after the interruption
    encoder = image_encoder("efficientnet-lite0")
    monkeypatch.setattr(embeddings, "RESUME_CHUNK", 8)
    real_batches = embeddings.feature_batches

    def interrupted_in_the_second_chunk(paths, *args, **kwargs):
        for indices, features in real_batches(paths, *args, **kwargs):
            if len(paths) == len(dataset) and indices[0] >= 10:
                raise KeyboardInterrupt
            yield indices, features

    cache = EmbeddingCache(tmp_path / "cache")
    monkeypatch.setattr(embeddings, "feature_batches", interrupted_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        image_embeddings(dataset, encoder, cache, batch_size=5, progress=False, on_error="skip")
    _, info = image_embeddings(dataset, encoder, cache, batch_size=5, progress=False, resume=True,
                               on_error="skip")
    assert info["resumed_rows"] == 8 and set(info["unreadable"]) == {3, 12}
    _, cached = image_embeddings(dataset, encoder, cache, progress=False, on_error="skip")
    assert cached["cached"] and cached["unreadable"] == info["unreadable"]
    with pytest.raises(DataError, match="2 image.*could not be decoded.*--on-error skip"):
        image_embeddings(dataset, encoder, cache, progress=False)  # the same entry, with --on-error fail
