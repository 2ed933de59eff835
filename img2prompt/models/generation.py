"""Decoding token sequences from a next-token scorer: greedy, beam search, nucleus sampling.

Model-agnostic: a *scorer* is ``scorer(tokens, rows) -> log-probabilities`` where ``tokens``
is a (n, t) LongTensor of the sequences so far (each starting with BOS) and ``rows`` says
which conditioning input (image) each sequence belongs to; it returns (n, vocabulary)
log-probabilities of the next token.
"""

from dataclasses import dataclass

import torch

from img2prompt.config import FIELDS, StudyConfig

STRATEGIES = FIELDS["decode_strategy"].metadata["choices"]


@dataclass
class DecodeOptions:
    """How to decode; the defaults are the study's (StudyConfig declares them)."""

    strategy: str = StudyConfig.decode_strategy         # greedy | beam | sample
    beam_width: int = StudyConfig.beam_width            # beams kept per input (beam)
    top_p: float = StudyConfig.top_p                    # nucleus: smallest token set holding this probability
    temperature: float = StudyConfig.temperature        # divides the logits before sampling (sample)
    max_length: int = StudyConfig.max_length            # most tokens generated, end-of-sequence included
    no_repeat_ngram: int = StudyConfig.no_repeat_ngram  # never generate an n-gram twice in one sequence
    length_penalty: float = 1.0                         # beam score = sum of log-probs / length ** penalty
    seed: int = StudyConfig.seed                        # sampling seed


def banned_tokens(sequence, n) -> set:
    """Tokens that would repeat an n-gram already in ``sequence`` (a list of ids)."""
    if n <= 0 or len(sequence) < n - 1:
        return set()
    if n == 1:
        return set(sequence[1:])  # BOS excluded
    tail = tuple(sequence[len(sequence) - (n - 1):])
    return {sequence[i + n - 1] for i in range(len(sequence) - n + 1)
            if tuple(sequence[i:i + n - 1]) == tail}


def _ban_repeats(log_probs, sequences, n):
    if n > 0:
        for row, sequence in enumerate(sequences):
            banned = banned_tokens(sequence, n)
            if banned:
                log_probs[row, list(banned)] = -float("inf")
    return log_probs


def generate(scorer, n_inputs, bos, eos, options: DecodeOptions) -> list:
    """One token list per input (BOS and EOS stripped), with ``options.strategy``."""
    if options.strategy not in STRATEGIES:
        raise ValueError(f"unknown decoding strategy '{options.strategy}'; use {', '.join(STRATEGIES)}.")
    if options.max_length < 1:
        raise ValueError("max_length must be at least 1.")
    if options.strategy == "beam":
        return _beam_search(scorer, n_inputs, bos, eos, options)
    return _left_to_right(scorer, n_inputs, bos, eos, options)


def _left_to_right(scorer, n_inputs, bos, eos, options):
    """Greedy (arg-max) or nucleus sampling, all inputs in one batch."""
    generator = torch.Generator().manual_seed(options.seed)
    rows = torch.arange(n_inputs)
    sequences = [[bos] for _ in range(n_inputs)]
    alive = list(range(n_inputs))
    for _ in range(options.max_length):
        tokens = torch.tensor([sequences[i] for i in alive])
        log_probs = _ban_repeats(scorer(tokens, rows[alive]).float(), [sequences[i] for i in alive],
                                 options.no_repeat_ngram)
        if options.strategy == "greedy":
            chosen = log_probs.argmax(dim=1)
        else:
            chosen = _nucleus_sample(log_probs / max(options.temperature, 1e-6), options.top_p, generator)
        still = []
        for index, token in zip(alive, chosen.tolist()):
            sequences[index].append(token)
            if token != eos:
                still.append(index)
        alive = still
        if not alive:
            break
    return [_strip(sequence, eos) for sequence in sequences]


def _nucleus_sample(logits, top_p, generator):
    probs = torch.softmax(logits, dim=1)
    sorted_probs, order = probs.sort(dim=1, descending=True)
    # keep the most probable tokens until their mass reaches top_p (the first always kept)
    outside = sorted_probs.cumsum(dim=1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    picked = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, picked).squeeze(1)


def _beam_search(scorer, n_inputs, bos, eos, options):
    """Keep the ``beam_width`` best partial sequences per input; a sequence that ends (EOS, or
    ``max_length`` reached) becomes a candidate; return the best-scoring candidate."""
    width = options.beam_width

    def final_score(score, length):
        return score / (length ** options.length_penalty)

    beams = [[(0.0, [bos])] for _ in range(n_inputs)]  # per input: (sum of log-probs, tokens)
    finished = [[] for _ in range(n_inputs)]           # per input: (final score, tokens)
    for step in range(1, options.max_length + 1):
        flat = [(i, score, seq) for i in range(n_inputs) for score, seq in beams[i]]
        if not flat:
            break
        tokens = torch.tensor([seq for _, _, seq in flat])
        rows = torch.tensor([i for i, _, _ in flat])
        log_probs = _ban_repeats(scorer(tokens, rows).float(), [seq for _, _, seq in flat],
                                 options.no_repeat_ngram)
        candidates = [[] for _ in range(n_inputs)]
        top_values, top_ids = log_probs.topk(min(width + 1, log_probs.shape[1]), dim=1)
        for (i, score, seq), values, ids in zip(flat, top_values.tolist(), top_ids.tolist()):
            candidates[i] += [(score + value, seq + [token]) for value, token in zip(values, ids)
                              if value > -float("inf")]
        for i in range(n_inputs):
            beams[i] = []
            # as in the usual beam search, a sequence ends only if its EOS ranks among the
            # ``width`` best candidates; live beams are the best non-ending ones
            for rank, (score, seq) in enumerate(sorted(candidates[i], key=lambda c: -c[0])):
                if len(beams[i]) == width:
                    break
                if seq[-1] == eos or step == options.max_length:
                    if rank < width:
                        finished[i].append((final_score(score, step), seq))
                else:
                    beams[i].append((score, seq))
            if _done(finished[i], beams[i], width, options.length_penalty):
                beams[i] = []
    return [_strip(max(finished[i], key=lambda c: c[0])[1], eos) if finished[i] else []
            for i in range(n_inputs)]


def _done(finished, beams, width, length_penalty):
    """Stop an input when enough sequences ended and no live beam can still beat the best:
    exact without length normalisation (log-probabilities only fall as a sequence grows)."""
    if not beams:
        return True
    if not finished:
        return False
    best_finished = max(score for score, _ in finished)
    if length_penalty == 0:
        return best_finished >= max(score for score, _ in beams)
    return len(finished) >= width


def _strip(sequence, eos):
    tokens = sequence[1:]
    return tokens[:tokens.index(eos)] if eos in tokens else tokens
