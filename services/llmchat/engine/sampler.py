"""One batched pass over a step's logits: the penalties and biases the requests ask for, then every row's next
token drawn together on the device, and the log-probabilities of what was drawn.

Rows that ask for nothing cost nothing here: each adjustment runs only for the rows that set it, as one
indexed update for all of them, so the step never loops over rows on the device.
"""

from collections.abc import Callable

import torch

from llmchat.engine.gpu import on_device
from llmchat.engine.sampling import MIN_TEMPERATURE, SamplingParams, TokenLogprob
from llmchat.engine.scheduler import Sequence


def adjust(logits: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int]) -> None:
    """Applies each row's repetition, frequency and presence penalties, logit_bias and min_tokens in place.

    In that order, as vLLM does: the repetition penalty scales the model's own logits, then the OpenAI
    penalties and the bias are added; then only allowed_token_ids stay, a sequence short of min_tokens cannot
    end (its end of sequence and stop_token_ids get -inf), and no bad word is completed. A grammar's mask comes
    after all of them, so a bias never breaks a grammar.
    """
    params = [seq.params for seq in seqs]
    vocab = logits.shape[1]
    repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeated:
        rows, tokens = _tokens(seqs, repeated, True, logits.device)
        keep = tokens < vocab  # a tokenizer may have tokens past the model's logits (never generated)
        keys = torch.unique(rows[keep] * vocab + tokens[keep])
        rows, tokens = keys // vocab, keys % vocab
        penalty = on_device([p.repetition_penalty for p in params], logits.device)[rows]
        values = logits[rows, tokens]
        logits[rows, tokens] = torch.where(values > 0, values / penalty, values * penalty).to(logits.dtype)
    counted = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    if counted:
        rows, tokens = _tokens(seqs, counted, False, logits.device)
        if rows.numel():
            frequency = on_device([p.frequency_penalty for p in params], logits.device, logits.dtype)
            presence = on_device([p.presence_penalty for p in params], logits.device, logits.dtype)
            # Once per occurrence: a token generated k times loses k times the frequency penalty.
            logits.index_put_((rows, tokens), -frequency[rows], accumulate=True)
            keys = torch.unique(rows * vocab + tokens)
            logits.index_put_((keys // vocab, keys % vocab), -presence[keys // vocab], accumulate=True)
    biased = [(i, token, bias) for i, p in enumerate(params) for token, bias in p.logit_bias if token < vocab]
    if biased:
        bias_rows, bias_tokens, biases = zip(*biased, strict=True)
        index = (on_device(bias_rows, logits.device), on_device(bias_tokens, logits.device))
        logits.index_put_(index, on_device(biases, logits.device, logits.dtype), accumulate=True)
    allowed = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if allowed:
        pairs = [(j, t) for j, i in enumerate(allowed) for t in params[i].allowed_token_ids if t < vocab]
        only = torch.full((len(allowed), vocab), float("-inf"), device=logits.device, dtype=logits.dtype)
        only_rows, only_tokens = zip(*pairs, strict=True)
        only[on_device(only_rows, logits.device), on_device(only_tokens, logits.device)] = 0.0
        logits.index_add_(0, on_device(allowed, logits.device), only)
    held = [
        (i, token)
        for i, seq in enumerate(seqs)
        if len(seq.completion_ids) < seq.params.min_tokens
        for token in eos_ids | seq.params.stop_token_ids
        if token < vocab
    ]
    held += [(i, token) for i, seq in enumerate(seqs) for token in _bad_words_next(seq) if token < vocab]
    if held:
        held_rows, held_tokens = zip(*held, strict=True)
        logits[on_device(held_rows, logits.device), on_device(held_tokens, logits.device)] = float("-inf")


def _bad_words_next(seq: Sequence) -> list[int]:
    """The tokens that would complete one of the sequence's bad words after what it has generated."""
    done = seq.completion_ids
    # The output's last len(word) - 1 tokens are the word's head (a one-token word's head is empty); an output
    # shorter than the head gives a shorter slice, which never equals it.
    return [word[-1] for word in seq.params.bad_words_ids if tuple(done[len(done) - len(word) + 1 :]) == word[:-1]]


def _tokens(
    seqs: list[Sequence], rows: list[int], with_prompt: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) of every generated token of the given rows (and each distinct prompt token), on the device."""
    parts: list[torch.Tensor] = []
    counts: list[int] = []
    for i in rows:
        seq = seqs[i]
        own = [torch.tensor(seq.completion_ids, dtype=torch.long)]
        if with_prompt:
            if seq.prompt_seen is None:
                seq.prompt_seen = torch.tensor(sorted(set(seq.prompt_ids)), dtype=torch.long)
            own.append(seq.prompt_seen)
        parts += own
        counts.append(sum(len(part) for part in own))
    tokens = torch.cat(parts)
    index = torch.repeat_interleave(torch.tensor(rows), torch.tensor(counts))
    return index.to(device, non_blocking=True), tokens.to(device, non_blocking=True)


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], num_tops: list[int], decode: Callable[[int], str]
) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its `num_tops` likeliest tokens, read back from the
    device once for all rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, on_device(tokens, logits.device)[:, None])[:, 0]
    values, ids = torch.topk(logprobs, max(num_tops))  # k=0 gives empty rows
    chosen_lp, top_lps, top_ids = chosen.tolist(), values.tolist(), ids.tolist()
    return [
        TokenLogprob(
            decode(token), chosen_lp[i], [(decode(t), v) for t, v in zip(top_ids[i][:n], top_lps[i][:n], strict=True)]
        )
        for i, (token, n) in enumerate(zip(tokens, num_tops, strict=True))
    ]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], list[bool]]:
    """Every row's next token, sampled together on the logits' device and read back once; and which rows'
    logits hold NaN or +inf or allow no token (their token means nothing; the caller ends those requests).

    Greedy rows (temperature ~0) take the argmax. The others apply their own top-k, temperature, min-p and
    top-p, then draw by the exponential race: argmax(p / E) with E ~ Exp(1) from the row's own generator picks
    token i with probability p_i, and, unlike torch.multinomial, does not assert on the device when a row
    is NaN (which on CUDA would kill the process's context).
    """
    # One pass for both: a row's maximum is NaN where it holds a NaN, +inf where it holds +inf, and -inf where nothing
    # is left to choose (constraints that together allow no token). Five passes over the logits took 5% of a step
    # of 8 rows on the CPU (Qwen2.5's 151k-token vocabulary).
    top, tokens = logits.max(dim=-1)
    broken = ~top.isfinite()
    drawn = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if drawn:
        index = on_device(drawn, logits.device)
        tokens[index] = _draw(logits[index].float(), [params[i] for i in drawn], [generators[i] for i in drawn])
    tokens, broken = torch.stack([tokens, broken.long()]).tolist()
    return tokens, [bool(b) for b in broken]


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    rows, vocab = logits.shape
    device = logits.device
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(ks) < vocab:
        # Everything below a row's k-th largest logit is out (ties at the threshold stay).
        top = torch.topk(logits, max(ks)).values
        threshold = top.gather(1, on_device(ks, device)[:, None] - 1)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    temperature = on_device([p.temperature for p in params], device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    if any(p.min_p for p in params):
        # The likeliest token always stays: its probability is at least min_p (<= 1) times itself.
        floor = on_device([p.min_p for p in params], device)[:, None] * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    top_p = [p.top_p for p in params]
    if min(top_p) < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the top token always stays (a top_p that
        # underflows to 0 in float32 would otherwise leave nothing to sample from).
        mass = torch.cumsum(sorted_probs, dim=-1)
        outside = mass - sorted_probs >= on_device(top_p, device)[:, None] * mass[:, -1:]
        outside[:, 0] = False
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(dim=-1)


def pick(
    logits: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int], masks, decode_one
) -> tuple[list[int], list[Exception | None], list[TokenLogprob | None]]:
    """Every row's next token in one pass: penalties and biases (adjust), grammar masks for all constrained rows at
    once (`masks`, constraints.GrammarMasks), logits processors, the draw. Returns the tokens, each row's error (its
    grammar's, its processor's, or logits that are not numbers) and, where asked for, its log-probabilities: the
    model's own, taken before masks, processors and temperature (`decode_one` spells a token)."""
    asking = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    raw = logits[asking] if asking else None  # a copy (indexed by a list)
    adjust(logits, seqs, eos_ids)
    errors: list[Exception | None] = list(masks.apply([seq.params.constraint for seq in seqs], logits))
    for i, seq in enumerate(seqs):
        try:
            for processor in seq.params.logits_processors:
                logits[i] = processor(seq.completion_ids, logits[i])
        except Exception as exc:
            errors[i] = errors[i] or exc
    tokens, broken = sample(logits, [seq.params for seq in seqs], [seq.generator for seq in seqs])
    entries: list[TokenLogprob | None] = [None] * len(seqs)
    if raw is not None:  # some rows ask
        nums = [seqs[i].params.logprobs or 0 for i in asking]  # never None in `asking` (`or 0` is for mypy)
        for i, entry in zip(asking, token_logprobs(raw, [tokens[i] for i in asking], nums, decode_one), strict=True):
            entries[i] = entry
    for i in range(len(seqs)):
        if broken[i] and errors[i] is None:
            errors[i] = FloatingPointError(
                "the model's logits for this request are not numbers (NaN or inf), or its constraints "
                "(allowed_token_ids, bad_words, min_tokens, a grammar) together allow no token"
            )
    return tokens, errors, entries
