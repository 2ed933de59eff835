"""Fine-tuning the encoder's top blocks with the mapper (--tune encoder)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from img2prompt.cli import main
from img2prompt.config import StudyConfig
from img2prompt.encoders.image import image_encoder
from img2prompt.errors import RunError
from img2prompt.models import finetune, training
from img2prompt.models.mapper import Mapper
from img2prompt.predict import Predictor
from img2prompt.run import Run

TUNE = ["--tune", "encoder", "--tune-blocks", "1", "--tune-epochs", "3", "--tune-patience", "5",
        ]


@pytest.fixture(scope="module")
def tuned_run(trained_run, tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("tuned") / "run"
    assert main(["train", "--data", str(trained_run["data"]), "--out", str(run), "--cache-dir",
                 str(cache_dir), "--quiet", *TUNE]) == 0
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    return {"data": trained_run["data"], "run": run, "frozen_run": trained_run["run"]}


def test_the_encoder_is_fine_tuned_after_the_mapper_and_saved(tuned_run):
    run = Run.open(tuned_run["run"])
    history = run.tune_history()
    assert list(history["epoch"]) == [0, 1, 2, 3]  # epoch 0: the mapper on frozen features
    assert history.loc[0, "val_cosine"] == pytest.approx(run.history().query("best")["val_cosine"].item(), abs=2e-3)
    assert history["best"].sum() == 1
    summary = json.loads((tuned_run["run"] / "config.json").read_text())["config"]
    assert summary["tune"] == "encoder" and summary["tune_blocks"] == 1
    # the file holds exactly the top block and the head; everything else stays ImageNet's
    saved = set(load_file(tuned_run["run"] / "encoder.safetensors"))
    frozen, tuned = image_encoder("efficientnet-lite0"), run.image_encoder()
    top = {name for name in frozen.model.state_dict() if name.startswith(("_blocks.15.", "_conv_head.", "_bn1."))}
    assert saved == top and tuned.tuned is not None
    kept = history.query("best")["epoch"].item()
    for name, value in tuned.model.state_dict().items():
        if name not in top or kept == 0:  # epoch 0 kept: fine-tuning did not help, nothing moved
            assert torch.equal(value, frozen.model.state_dict()[name]), name
    assert (tuned_run["run"] / "figures" / "tune_curve.png").is_file()


def test_frozen_and_fine_tuned_features_never_share_a_cache_entry(tuned_run):
    run = Run.open(tuned_run["run"])
    frozen, tuned = run.image_encoder(tuned=False), run.image_encoder()
    assert "tuned" not in frozen.fingerprint() and tuned.fingerprint()["tuned"]
    assert frozen.fingerprint() == image_encoder("efficientnet-lite0").fingerprint()


def test_saved_tuned_layers_are_the_ones_the_encoder_uses(small_dataset, tmp_path):
    images = sorted((small_dataset / "images").glob("*.png"))[:2]
    tuned_in_memory = image_encoder("efficientnet-lite0")
    top = finetune.TunedTop(tuned_in_memory, Mapper(1280, 4), tune_blocks=2)
    with torch.no_grad():
        for parameter in top.layers.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    finetune.save_tuned(top, tmp_path / "encoder.safetensors")
    loaded = image_encoder("efficientnet-lite0").use_tuned(tmp_path / "encoder.safetensors")
    frozen = image_encoder("efficientnet-lite0").encode(images)
    np.testing.assert_allclose(loaded.encode(images), tuned_in_memory.encode(images), atol=1e-5)
    assert not np.allclose(loaded.encode(images), frozen, atol=1e-3)


def test_evaluation_pairs_fine_tuned_and_frozen_methods(tuned_run):
    metrics = Run.open(tuned_run["run"]).metrics()
    assert metrics.tune == "encoder"
    assert {"mapper", "retrieval", "frozen_mapper", "frozen_retrieval"} <= set(metrics.methods)
    assert {"mapper_minus_frozen_mapper", "retrieval_minus_frozen_retrieval"} <= set(metrics.data["comparisons"])
    frozen_metrics = Run.open(tuned_run["frozen_run"]).metrics()
    # the frozen methods of the tuned run are those of a run trained without tuning
    assert metrics.method("frozen_mapper")["mean_cosine"] == pytest.approx(
        frozen_metrics.method("mapper")["mean_cosine"], abs=1e-6)
    assert "color" in metrics.method("frozen_retrieval")["attribute_accuracy"]
    results = Run.open(tuned_run["run"]).results()
    assert {"cosine_frozen_mapper", "cosine_frozen_retrieval", "frozen_predicted_prompt"} <= set(results.columns)


def test_prediction_uses_the_fine_tuned_encoder(tuned_run):
    run = Run.open(tuned_run["run"])
    test = run.data().part("test")
    predictor = Predictor(run)
    features = predictor.encode(run.image_paths(test["images"][:3]))
    np.testing.assert_allclose(features, test["image_emb"][:3], atol=1e-4)


def test_an_interrupted_fine_tuning_resumes_to_the_same_result(tmp_path, monkeypatch):
    encoder = image_encoder("efficientnet-lite0")
    torch.manual_seed(0)
    trunk = torch.randn(40, 192, 7, 7).half()  # what the trunk gives below the top block
    target = torch.randn(40, 6)
    config = StudyConfig(tune_blocks=1, tune_epochs=4, tune_patience=10, tune_batch_size=8,
                         accumulate_steps=2)

    def fresh_mapper():
        torch.manual_seed(1)
        return Mapper(1280, 6, 16, 1, 0.1)

    _, uninterrupted = finetune.fine_tune(image_encoder("efficientnet-lite0"), fresh_mapper(), trunk[:30],
                                          target[:30], trunk[30:], target[30:], config, progress=False)
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0)
    real, calls = finetune.mapper_cosines, []

    def stop_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # epoch 0, 1, 2 validated; the state of epoch 2 saved
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    state = tmp_path / "tune_state.pt"
    monkeypatch.setattr(finetune, "mapper_cosines", stop_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.fine_tune(encoder, fresh_mapper(), trunk[:30], target[:30], trunk[30:], target[30:],
                           config, progress=False, state_path=state)
    monkeypatch.setattr(finetune, "mapper_cosines", real)
    _, resumed = finetune.fine_tune(image_encoder("efficientnet-lite0"), fresh_mapper(), trunk[:30],
                                    target[:30], trunk[30:], target[30:], config, progress=False,
                                    state_path=state, resume=True)
    pd.testing.assert_frame_equal(resumed.drop(columns=["seconds", "samples_per_s"]),
                                  uninterrupted.drop(columns=["seconds", "samples_per_s"]))
    with pytest.raises(RunError, match="other data or settings"):
        finetune.fine_tune(image_encoder("efficientnet-lite0"), fresh_mapper(), trunk[:30], target[:30] * 2,
                           trunk[30:], target[30:], config, progress=False, state_path=state, resume=True)


def test_an_encoder_that_cannot_be_tuned_says_so(monkeypatch):
    encoder = image_encoder("efficientnet-lite0")
    monkeypatch.setattr(type(encoder), "blocks", super(type(encoder), encoder).blocks.__func__)
    with pytest.raises(RunError, match="--tune head"):
        encoder.blocks(None)


def test_more_blocks_than_the_encoder_has_are_refused():
    with pytest.raises(RunError, match="has 16 blocks"):
        finetune.TunedTop(image_encoder("efficientnet-lite0"), Mapper(1280, 4), tune_blocks=17)


def test_tuned_layers_of_another_encoder_are_refused(tuned_run):
    other = image_encoder("efficientnet-lite2").use_tuned(tuned_run["run"] / "encoder.safetensors")
    with pytest.raises(RunError, match="was not made for this run's settings"):
        _ = other.model
