"""The bf16 path a GPU takes, run on the CPU: the mapper, the decoder, the fine-tuning and
generation under ``torch.autocast("cpu", dtype=torch.bfloat16)`` through the code CUDA runs
(``devices.BF16_ON_CPU``), their results checked against float32.

Tolerances: bf16 keeps 8 bits of mantissa (about 2 decimal digits), so a training's
validation cosine may move by a few hundredths; the weights stay float32."""

import numpy as np
import pytest
import torch

from img2prompt import devices
from img2prompt.config import StudyConfig
from img2prompt.models.decoder import DecodeOptions, build_decoder
from img2prompt.models.training import train_decoder, train_mapper

from .test_decoder import tiny_config, toy_data


@pytest.fixture
def bf16(monkeypatch):
    """Run the test's second half on CUDA's bf16 path, on the CPU."""
    def on():
        monkeypatch.setattr(devices, "BF16_ON_CPU", True)
        assert devices.autocast(torch.device("cpu")) is not None and devices.precision(torch.device("cpu")) == "bf16"
    return on


def mapping_data(seed=0):
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=(120, 32)).astype(np.float32), rng.normal(size=(32, 16)).astype(np.float32)
    return x, np.tanh(x @ w)


def test_bf16_mapper_trains_as_float32(bf16):
    x, y = mapping_data()
    config = StudyConfig(hidden_size=64, max_epochs=20, patience=50, batch_size=16)
    _, fp32 = train_mapper(x[:90], y[:90], x[90:], y[90:], config, progress=False)
    bf16()
    model, half = train_mapper(x[:90], y[:90], x[90:], y[90:], config, progress=False)
    assert next(model.parameters()).dtype == torch.float32  # the weights stay float32
    assert abs(half["val_cosine"].max() - fp32["val_cosine"].max()) < 0.02


def test_bf16_decoder_trains_as_float32(bf16):
    x, prompts = toy_data()
    config = tiny_config(decoder_epochs=12)
    histories = []
    for turn in range(2):
        if turn:
            bf16()
        decoder = build_decoder("tiny", x.shape[1], prompts, 2, 32, 1, 2, 0.0, seed=1)
        histories.append(train_decoder(decoder, x, prompts, x, prompts, config, progress=False)[0])
    fp32, half = histories
    assert half["val_loss"].iloc[-1] < 0.6 * half["val_loss"].iloc[0]  # it learns
    assert not half["val_loss"].equals(fp32["val_loss"])  # in bf16 (the weights' updates differ)
    np.testing.assert_allclose(half["val_loss"], fp32["val_loss"], rtol=0.02)


def test_bf16_generation_writes_what_float32_writes(bf16):
    x, prompts = toy_data()
    decoder = build_decoder("tiny", x.shape[1], prompts, 2, 32, 1, 2, 0.0, seed=1)
    train_decoder(decoder, x, prompts, x, prompts, tiny_config(decoder_epochs=25), progress=False)
    options = DecodeOptions(strategy="greedy", max_length=12)
    fp32 = decoder.generate(x, options)
    bf16()
    half = decoder.generate(x, options)
    assert np.mean([a == b for a, b in zip(half, fp32)]) >= 0.9  # a rare near-tie may flip a word


def test_bf16_fine_tuning_trains_as_float32(bf16):
    from img2prompt.encoders.image import image_encoder
    from img2prompt.models.finetune import fine_tune
    from img2prompt.models.mapper import Mapper
    torch.manual_seed(0)
    trunk, target = torch.randn(40, 192, 7, 7).half(), torch.randn(40, 6)
    config = StudyConfig(tune_blocks=1, tune_epochs=2, tune_patience=5, tune_batch_size=8)
    histories = []
    for turn in range(2):
        if turn:
            bf16()
        torch.manual_seed(1)
        histories.append(fine_tune(image_encoder("efficientnet-lite0"), Mapper(1280, 6, 16, 1, 0.0), trunk[:30],
                                   target[:30], trunk[30:], target[30:], config, progress=False)[1])
    fp32, half = histories
    np.testing.assert_allclose(half["val_cosine"], fp32["val_cosine"], atol=0.03)
