"""Sampler: every processor and filter against HF's logits processors / the OpenAI formula,
seeded sampling, the sampled distribution (chi-square) and logprobs."""

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs
from engine.sampling_params import SamplingParams

VOCAB_SIZE = 64
EOS = 3


def _random_history(num_rows: int, gen: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and output token ids with repeats, so counts above 1 occur."""
    def ids(max_len):
        length = int(torch.randint(0, max_len, (), generator=gen))
        return torch.randint(0, VOCAB_SIZE // 2, (length,), generator=gen).tolist()
    return [ids(12) for _ in range(num_rows)], [ids(10) for _ in range(num_rows)]


def _reference_row(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int],
                   eos: int | None) -> torch.Tensor:
    """One row through HF's processors (float64), in the sampler's documented order."""
    scores = logits.double().clone().unsqueeze(0)
    for token_id, bias in (p.logit_bias or {}).items():
        scores[0, token_id] += bias
    if len(output) < p.min_tokens:
        for token_id in p.stop_token_ids + ([] if p.ignore_eos or eos is None else [eos]):
            scores[0, token_id] = float("-inf")
    history = torch.tensor([prompt + output], dtype=torch.int64)
    scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(history, scores)
    for token_id in set(output):  # OpenAI: mu[j] -= c[j] * frequency + (c[j] > 0) * presence
        scores[0, token_id] -= output.count(token_id) * p.frequency_penalty + p.presence_penalty
    if p.temperature > 1e-5:
        scores = TemperatureLogitsWarper(p.temperature)(history, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(history, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(history, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(history, scores)
    return scores[0]


def _build(params, prompts, outputs, generators=None, eos=EOS, vocab_size=VOCAB_SIZE):
    n = len(params)
    return SamplingMetadata.build(params, prompts, outputs, generators or [None] * n, "cpu",
                                  vocab_size, eos_token_ids=[eos] * n)


def _assert_matches_reference(params: list[SamplingParams], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(params), VOCAB_SIZE, generator=gen) * 3
    prompts, outputs = _random_history(len(params), gen)
    processed = Sampler().process_logits(logits, _build(params, prompts, outputs))
    for row, p in enumerate(params):
        expected = _reference_row(logits[row], p, prompts[row], outputs[row], EOS)
        kept = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(processed[row]), kept), f"row {row}: {p}"
        torch.testing.assert_close(processed[row][kept].double(), expected[kept], rtol=1e-5, atol=1e-5)


CASES = {
    "temperature": [SamplingParams(temperature=t) for t in (0.05, 0.5, 1.0, 1.7, 3.0)],
    "top_k": [SamplingParams(top_k=k) for k in (1, 2, 7, VOCAB_SIZE - 1, VOCAB_SIZE, VOCAB_SIZE + 5, 0)],
    "top_p": [SamplingParams(top_p=p) for p in (1e-6, 0.1, 0.5, 0.9, 0.999, 1.0)],
    "min_p": [SamplingParams(min_p=p) for p in (0.0, 0.01, 0.1, 0.5, 1.0)],
    "repetition_penalty": [SamplingParams(repetition_penalty=r) for r in (0.5, 1.0, 1.3, 2.0)],
    "presence_penalty": [SamplingParams(presence_penalty=x) for x in (-2.0, -0.5, 0.0, 0.7, 2.0)],
    "frequency_penalty": [SamplingParams(frequency_penalty=x) for x in (-2.0, -0.3, 0.0, 0.4, 2.0)],
    "presence_and_frequency": [SamplingParams(presence_penalty=a, frequency_penalty=b)
                               for a, b in ((0.5, 0.5), (-1.0, 1.5), (2.0, -2.0))],
    "logit_bias": [SamplingParams(logit_bias={0: 5.0, 7: -100.0}), SamplingParams(logit_bias={63: 2.5}),
                   SamplingParams()],
    "min_tokens": [SamplingParams(min_tokens=m, max_tokens=64, stop_token_ids=[5, 9], ignore_eos=ie)
                   for m in (0, 4, 20) for ie in (False, True)],
    "top_k_top_p_min_p": [SamplingParams(temperature=0.7, top_k=k, top_p=p, min_p=m)
                          for k, p, m in ((5, 0.8, 0.1), (0, 0.6, 0.0), (20, 1.0, 0.2), (3, 0.3, 0.5))],
    "greedy_with_penalties": [SamplingParams(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5),
                              SamplingParams(temperature=0.0)],
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_processing_matches_reference(case, seed):
    _assert_matches_reference(CASES[case], seed)


@pytest.mark.parametrize("seed", range(4))
def test_mixed_batch_matches_row_by_row_reference(seed):
    """Rows with unrelated settings in one batch each get exactly their own processing."""
    gen = torch.Generator().manual_seed(100 + seed)

    def draw(values):
        return values[int(torch.randint(0, len(values), (), generator=gen))]

    params = [
        SamplingParams(
            temperature=draw([0.0, 0.3, 1.0, 1.5]), top_k=draw([0, 1, 5, 40]), top_p=draw([1.0, 0.9, 0.5]),
            min_p=draw([0.0, 0.05, 0.3]), repetition_penalty=draw([1.0, 1.1, 0.8]),
            presence_penalty=draw([0.0, 0.5, -1.0]), frequency_penalty=draw([0.0, 0.3, -0.2]),
            logit_bias=draw([None, {1: 3.0, 2: -4.0}]), min_tokens=draw([0, 3, 30]), max_tokens=64,
            stop_token_ids=[6],
        )
        for _ in range(12)
    ]
    _assert_matches_reference(params, seed)


def test_greedy_rows_take_argmax_and_random_rows_stay_in_support():
    gen = torch.Generator().manual_seed(7)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5), SamplingParams(top_k=3),
              SamplingParams(temperature=0.0, logit_bias={11: 50.0}), SamplingParams(top_p=0.2, seed=5)] * 3
    prompts, outputs = _random_history(len(params), gen)
    logits = torch.randn(len(params), VOCAB_SIZE, generator=gen)
    generators = [torch.Generator().manual_seed(5) if p.seed else None for p in params]
    metadata = _build(params, prompts, outputs, generators)
    processed = Sampler().process_logits(logits, metadata)
    sampled = Sampler()(logits, metadata).sampled_token_ids
    for row, p in enumerate(params):
        if p.temperature == 0.0:
            assert sampled[row] == processed[row].argmax()
        assert torch.isfinite(processed[row, sampled[row]])
    assert (sampled[2::4] == 11).all()


def _seeded_run(seed: int, other_rows: list[SamplingParams], position: int, steps: int = 8) -> list[int]:
    """Tokens of one seeded request sampled `steps` times inside a batch of other requests."""
    target = SamplingParams(temperature=1.3, top_p=0.95, seed=seed)
    params = other_rows[:position] + [target] + other_rows[position:]
    generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    step_logits = torch.Generator().manual_seed(1234)
    noise_logits = torch.Generator().manual_seed(len(params))
    tokens = []
    for _ in range(steps):
        logits = torch.randn(len(params), 500, generator=noise_logits)
        logits[position] = torch.randn(500, generator=step_logits) * 0.5
        history = [[1, 2, 3]] * len(params)
        metadata = SamplingMetadata.build(params, history, history, generators, "cpu", 500)
        tokens.append(int(Sampler()(logits, metadata).sampled_token_ids[position]))
    return tokens


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    alone = _seeded_run(42, [], 0)
    others = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=7, top_k=5),
              SamplingParams(temperature=0.5, presence_penalty=1.0)]
    assert _seeded_run(42, [], 0) == alone
    assert _seeded_run(42, others, 0) == alone
    assert _seeded_run(42, others, 3) == alone
    assert _seeded_run(43, others, 3) != alone


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; tokens outside the support must never be drawn."""
    total = counts.sum()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support] * total
    assert expected.min() >= 5, "too few expected draws for the chi-square approximation"
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(support.sum().item() - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, statistic / 2).item()


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize(
    "kwargs, wrong_kwargs",
    [
        (dict(temperature=0.5), dict(temperature=0.6)),
        (dict(temperature=1.0), dict(temperature=1.2)),
        (dict(temperature=2.0), dict(temperature=1.5)),
        (dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05), dict(temperature=0.8)),
    ],
)
def test_sampled_distribution_matches_softmax(kwargs, wrong_kwargs, seeded):
    vocab_size, num_samples = 12, 20000
    torch.manual_seed(0)
    logits = torch.randn(vocab_size, generator=torch.Generator().manual_seed(3)) * 0.7
    params = [SamplingParams(seed=0 if seeded else None, **kwargs)] * num_samples
    generators = [torch.Generator().manual_seed(i) for i in range(num_samples)] if seeded else None
    history = [[]] * num_samples
    metadata = _build(params, history, history, generators, eos=None, vocab_size=vocab_size)
    sampled = Sampler()(logits.expand(num_samples, -1), metadata).sampled_token_ids
    counts = torch.bincount(sampled, minlength=vocab_size).double()

    def p_value(**params_kwargs):
        reference = _reference_row(logits, SamplingParams(**params_kwargs), [], [], None)
        return _chi_square_p_value(counts, reference.softmax(-1))

    assert p_value(**kwargs) > 1e-3
    assert p_value(**wrong_kwargs) < 1e-6  # the test can tell a wrong distribution apart


def test_logprobs_are_log_softmax_of_raw_logits():
    gen = torch.Generator().manual_seed(11)
    params = [SamplingParams(logprobs=k, temperature=t, repetition_penalty=1.5, logit_bias={4: 9.0})
              for k, t in ((None, 1.0), (0, 0.0), (3, 0.7), (5, 1.0))]
    prompts, outputs = _random_history(len(params), gen)
    logits = torch.randn(len(params), VOCAB_SIZE, generator=gen) * 4
    out = Sampler()(logits, _build(params, prompts, outputs))
    expected = torch.log_softmax(logits.double(), dim=-1)
    top_logprobs, top_ids = expected.topk(5, dim=-1)
    assert out.logprob_token_ids.shape == out.logprobs.shape == (len(params), 5)
    assert torch.equal(out.logprob_token_ids, top_ids)
    torch.testing.assert_close(out.logprobs.double(), top_logprobs, atol=1e-5, rtol=0)
    sampled_expected = expected.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.sampled_logprobs.double(), sampled_expected, atol=1e-5, rtol=0)


def test_sampled_logprobs_without_top_logprobs():
    logits = torch.randn(3, VOCAB_SIZE, generator=torch.Generator().manual_seed(2))
    history = [[]] * 3
    out = Sampler()(logits, _build([SamplingParams(temperature=0.0)] * 3, history, history))
    assert out.logprob_token_ids is None and out.logprobs is None
    expected = torch.log_softmax(logits.double(), -1).gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.sampled_logprobs.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_logits", [7, 6, 3])
def test_prompt_logprobs(num_logits):
    prompt = [5, 17, 2, 40, 40, 9, 1]
    logits = torch.randn(num_logits, VOCAB_SIZE, generator=torch.Generator().manual_seed(num_logits))
    result = compute_prompt_logprobs(logits, prompt, num_logprobs=4)
    num_rows = min(num_logits, len(prompt) - 1)
    expected = torch.log_softmax(logits[:num_rows].double(), -1)
    targets = torch.tensor(prompt[1:num_rows + 1]).unsqueeze(1)
    torch.testing.assert_close(result.selected_logprobs.double(), expected.gather(1, targets).squeeze(1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(result.logprobs.double(), expected.topk(4, -1).values, atol=1e-5, rtol=0)
    assert torch.equal(result.token_ids, expected.topk(4, -1).indices)


def test_build_rejects_bad_input():
    with pytest.raises(ValueError, match="logit_bias"):
        _build([SamplingParams(logit_bias={VOCAB_SIZE: 1.0})], [[]], [[]])
    with pytest.raises(ValueError, match="stop_token_ids"):
        _build([SamplingParams(min_tokens=2, stop_token_ids=[VOCAB_SIZE + 1])], [[]], [[]])
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingMetadata.build([SamplingParams()] * 2, [[]], [[], []], [None, None], "cpu", VOCAB_SIZE)
