"""Shared fixtures: small generated datasets, a trained run, tiny random models."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach a hub from the tests
# --device auto means the CPU in the tests (and the commands they start), on a GPU machine
# too: a test about another device asks for it by name
os.environ["IMG2PROMPT_AUTO_DEVICE"] = "cpu"

from img2prompt.cli import main
from img2prompt.data.synth import SynthParams, generate_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """24 generated images: enough for data, cache and encoder tests."""
    return generate_dataset(tmp_path_factory.mktemp("small") / "data", SynthParams(n=24, size=96, seed=3))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir):
    """The CLI's full path on 200 generated images: synth, train, evaluate."""
    root = tmp_path_factory.mktemp("e2e")
    data, run = root / "data", root / "run"
    assert main(["data", "synth", "--out", str(data), "--n", "200", "--seed", "0"]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--cache-dir", str(cache_dir),
                 "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    return {"data": data, "run": run}


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache with nothing in it, whatever this machine has downloaded: a test
    of the 'not on this machine' messages must not find bert-base-uncased or CLIP there."""
    import huggingface_hub.constants as constants
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def shared_set(name) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real sample data {path} is absent (it sits beside the project in CI only)")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A BERT with random weights and 32-d output, saved like a downloaded model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from img2prompt.encoders.text import minilm_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(folder)
    return folder
