"""``--engine ray``: a Ray Data pipeline on a local Ray instance extracts what the in-process
path extracts, into the same cache entry, resumable shard by shard, with the same errors."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from img2prompt.config import StudyConfig
from img2prompt.data.dataset import load_dataset
from img2prompt.encoders import embeddings
from img2prompt.encoders.embeddings import (
    EmbeddingCache,
    dataset_embeddings,
    image_embeddings,
)
from img2prompt.encoders.image import image_encoder
from img2prompt.encoders.ray_engine import RayEngine
from img2prompt.errors import DataError, RunError

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow  # several processes: `./run_tests.sh -m slow`


def test_no_cluster_at_the_address_is_one_message(small_dataset, tmp_path):
    # in a process of its own: the other tests' local instance would answer to "auto"
    result = subprocess.run([sys.executable, "-m", "img2prompt", "embed", "--data", str(small_dataset),
                             "--cache-dir", str(tmp_path), "--engine", "ray", "--ray-address", "auto"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--ray-address auto: no Ray cluster could be reached" in result.stderr
    assert "Traceback" not in result.stderr


def test_apple_mps_is_refused_before_anything_starts():
    with pytest.raises(RunError, match="--engine local for Apple's MPS"):
        RayEngine().prepare(image_encoder("efficientnet-lite0"), "mps")


@pytest.fixture(scope="module")
def local_ray():
    """One local instance for the module (an engine leaves a running Ray as it found it)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_extracts_the_in_process_features_into_the_same_cache_entry(local_ray, small_dataset, tmp_path):
    dataset = load_dataset(small_dataset)
    config = StudyConfig(data_dir=str(small_dataset), cache_dir=str(tmp_path / "ray"), embed_batch_size=5,
                         engine="ray")  # the default decoder input: pooled, grid of both maps, colours
    on_ray = dataset_embeddings(config, dataset, progress=False, log=lambda _: None).load_decoder_emb()
    assert ray.is_initialized()  # a running instance is left running
    local = StudyConfig(data_dir=str(small_dataset), cache_dir=str(tmp_path / "local"))
    in_process = dataset_embeddings(local, dataset, progress=False, log=lambda _: None).load_decoder_emb()
    np.testing.assert_allclose(on_ray, in_process, atol=1e-5)
    names = [sorted(p.name for p in (tmp_path / side / "embeddings").glob("*.safetensors"))
             for side in ("ray", "local")]
    assert names[0] == names[1] and len(names[0]) == 2  # image and prompt entries, same keys


def test_an_interrupted_ray_extraction_resumes_shard_by_shard(local_ray, small_dataset, tmp_path, monkeypatch):
    dataset = load_dataset(small_dataset)
    engine = RayEngine()
    encoder = engine.prepare(image_encoder("efficientnet-lite0"))
    expected, _ = image_embeddings(dataset, image_encoder("efficientnet-lite0"), progress=False)
    monkeypatch.setattr(embeddings, "RESUME_CHUNK", 8)
    real_batches, seen = RayEngine.feature_batches, []

    def interrupted_after_ten_rows(self, paths, *args, **kwargs):
        seen.append(list(paths))
        for indices, features in real_batches(self, paths, *args, **kwargs):
            if len(seen) == 1 and indices[0] >= 10:
                raise KeyboardInterrupt
            yield indices, features

    monkeypatch.setattr(RayEngine, "feature_batches", interrupted_after_ten_rows)
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        image_embeddings(dataset, encoder, cache, batch_size=5, progress=False, engine=engine)
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.part-*.safetensors"))) == 1

    array, info = image_embeddings(dataset, encoder, cache, batch_size=5, progress=False, resume=True,
                                   engine=engine)
    assert info["resumed_rows"] == 8 and seen[1] == dataset.paths[8:]  # only the rest went to Ray
    np.testing.assert_allclose(array, expected, atol=1e-5)
    assert not list((tmp_path / "cache" / "embeddings").glob("*.part-*.safetensors"))


def test_a_bad_image_is_named_or_skipped_as_in_process(local_ray, small_dataset, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(small_dataset, copy)
    dataset = load_dataset(copy)
    dataset.paths[7].write_bytes(b"not a png")  # broken after the dataset was checked
    engine = RayEngine()
    encoder = engine.prepare(image_encoder("efficientnet-lite0"))
    with pytest.raises(DataError, match=f"{dataset.paths[7].name}: not a readable image"):
        image_embeddings(dataset, encoder, progress=False, batch_size=4, engine=engine)
    on_ray, info = image_embeddings(dataset, encoder, progress=False, batch_size=4, engine=engine,
                                    on_error="skip")
    in_process, local_info = image_embeddings(dataset, image_encoder("efficientnet-lite0"), progress=False,
                                              batch_size=4, on_error="skip")
    assert set(info["unreadable"]) == set(local_info["unreadable"]) == {7}
    assert dataset.paths[7].name in info["unreadable"][7]
    np.testing.assert_allclose(on_ray, in_process, atol=1e-5)


def test_a_node_without_the_dataset_stops_the_extraction_even_with_skip(small_dataset, tmp_path):
    """A decoding task on a machine that cannot see a file: never recorded as an unreadable
    image (with --on-error skip the whole dataset would be dropped and cached so)."""
    from img2prompt.encoders.ray_engine import NOT_ON_NODE, _decode
    encoder = image_encoder("efficientnet-lite0")
    there = str(next((small_dataset / "images").iterdir()))
    decoded = _decode({"index": np.array([0, 1]), "path": np.array([there, str(tmp_path / "elsewhere.png")])},
                      encoder.preprocessor(), 10**8)
    assert decoded["error"][0] == "" and decoded["error"][1].startswith(NOT_ON_NODE)
    assert "not found on the Ray node" in decoded["error"][1] and "shared filesystem" in decoded["error"][1]


def test_a_cluster_s_gpus_are_looked_at_before_this_machine_s(small_dataset, monkeypatch):
    """--device cuda from a head without a GPU: the cluster decides, not the local check."""
    engine = RayEngine("ray://cluster:10001")
    monkeypatch.setattr(engine, "connect", lambda: type("Cluster", (), {"cluster_resources": lambda: {"GPU": 8}}))
    assert engine.prepare(image_encoder("efficientnet-lite0"), "cuda").device.type == "cuda"
    monkeypatch.setattr(engine, "connect", lambda: type("Cluster", (), {"cluster_resources": lambda: {"CPU": 64}}))
    with pytest.raises(RunError, match="has no GPU"):
        engine.prepare(image_encoder("efficientnet-lite0"), "cuda")


def test_a_hugging_face_encoder_s_weights_never_travel_with_the_decoding_tasks(tmp_path):
    import pickle

    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    folder = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    encoder = image_encoder(str(folder))
    _ = encoder.model, encoder.dim  # loaded, as on the driver
    sent = len(pickle.dumps(encoder.preprocessor()))
    assert sent < 20_000 < len(pickle.dumps(encoder)), sent
