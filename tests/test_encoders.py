"""Encoders: the packaged models for real, the hub-style ones with tiny random weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from img2prompt.encoders.image import image_encoder
from img2prompt.encoders.text import metric_encoder, minilm_path, text_encoder
from img2prompt.errors import ModelUnavailableError

PROMPTS = ["two large red triangles on the left, on a black background, pixel art",
           "a small blue star", "a photo of a cat sitting on a sofa, soft light"]


def pictures():
    return [Image.new("RGB", (120, 90), (200, 40, 40)), Image.new("RGB", (64, 64), (10, 10, 200))]


@pytest.mark.parametrize("name, dim", [("efficientnet-lite0", 1280), ("efficientnet-lite2", 1280)])
def test_packaged_efficientnet(name, dim):
    encoder = image_encoder(name)
    assert encoder.dim == dim
    features = encoder.encode(pictures())
    assert features.shape == (2, dim) and features.dtype == np.float32
    assert not np.allclose(features[0], features[1])
    expected_size = {"efficientnet-lite0": 224, "efficientnet-lite2": 260}[name]
    tensor = encoder.preprocess(pictures()[0])
    assert tensor.shape == (3, expected_size, expected_size) and tensor.dtype == torch.uint8
    scaled = encoder.normalize(tensor[None])
    assert -1.0 <= scaled.min() and scaled.max() <= 1.0  # Lite inputs live in [-1, 1]


def test_channels_last_matches_plain_layout():
    """Two copies of the model: the encoder's own (channels_last) and a plain one."""
    encoder = image_encoder("efficientnet-lite0")
    batch = torch.stack([encoder.preprocess(p) for p in pictures()])
    fast = encoder.forward(batch)
    conv = next(p for p in encoder.model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # the fast path really ran
    plain_model = image_encoder("efficientnet-lite0")._load().eval()
    plain_conv = next(p for p in plain_model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert not plain_conv.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        plain = encoder._features(plain_model, encoder.normalize(batch))
    assert torch.allclose(plain, fast, atol=1e-4)


def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    ours = metric_encoder().encode(PROMPTS)
    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(PROMPTS, normalize_embeddings=True)
    assert ours.shape == (3, 384)
    assert np.allclose(ours, reference, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_minilm_refuses_other_pooling():
    with pytest.raises(ModelUnavailableError, match="fixed metric encoder"):
        text_encoder("minilm", pooling="cls")


def test_bert_from_local_folder_with_each_pooling(tiny_bert):
    results = {}
    for pooling in ("cls", "mean", "max", "pooler"):
        encoder = text_encoder("bert", model=str(tiny_bert), pooling=pooling)
        results[pooling] = encoder.encode(PROMPTS)
        assert results[pooling].shape == (3, 32) and encoder.dim == 32
    assert not np.allclose(results["cls"], results["mean"])
    assert not np.allclose(results["mean"], results["max"])
    # batching by length must not change a text's embedding
    single = text_encoder("bert", model=str(tiny_bert), pooling="mean").encode(PROMPTS[:1])
    assert np.allclose(single[0], results["mean"][0], atol=1e-5)


def test_bert_missing_says_how_to_provide_it(tmp_path, empty_hf_cache):
    encoder = text_encoder("bert", model=str(tmp_path / "no-such-model"))
    with pytest.raises(ModelUnavailableError, match="--text-model"):
        encoder.encode(["x"])
    with pytest.raises(ModelUnavailableError, match="Hugging Face cache"):
        text_encoder("bert").encode(["x"])  # bert-base-uncased is not on this machine


def test_resnet50_with_weights_file(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    path = tmp_path / "resnet50-random.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    encoder = image_encoder("resnet50", weights=str(path))
    features = encoder.encode(pictures())
    assert features.shape == (2, 2048) and encoder.dim == 2048
    assert encoder.preprocess(pictures()[0]).shape == (3, 224, 224)


def test_resnet50_without_weights_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="--image-weights"):
        image_encoder("resnet50").encode(pictures())
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ModelUnavailableError, match="not a torchvision ResNet50 state_dict"):
        image_encoder("resnet50", weights=str(bad)).encode(pictures())


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64),
        projection_dim=24)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hugging_face_vision_models_from_folders(tiny_vit, tiny_clip):
    vit = image_encoder(str(tiny_vit))
    assert vit.preprocess(pictures()[0]).shape == (3, 32, 32)
    features = vit.encode(pictures())
    assert features.shape == (2, 32) and vit.dim == 32
    clip = image_encoder(str(tiny_clip))
    assert clip.encode(pictures()).shape == (2, 24)  # the projected image embedding


def test_unknown_or_missing_image_encoders(tmp_path, empty_hf_cache):
    with pytest.raises(ModelUnavailableError, match="unknown image encoder"):
        image_encoder("vgg99")
    with pytest.raises(ModelUnavailableError, match="save_pretrained"):
        image_encoder("openai/clip-vit-base-patch32").encode(pictures())
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelUnavailableError, match="could not be loaded"):
        image_encoder(str(empty)).encode(pictures())
