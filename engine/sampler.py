"""Batched next-token sampling: logits processors, filters, seeded sampling and logprobs.

Layouts: N rows (one per sequence sampled this step), V = vocab size; logits are [N, V] float32
on the model's device and every per-row tensor below lives on that device.

One pass over the whole batch, in this order: logit bias, min_tokens (eos and stop ids masked),
repetition penalty (HF semantics, over prompt + output tokens), presence/frequency penalties
(OpenAI formula, over output tokens), temperature, top-k, top-p, min-p (HF's warper order),
then argmax for greedy rows and exponential-race sampling for the others.

Logprobs are the log_softmax of the RAW logits, before any penalty, bias, temperature or
filter: vLLM's default ("raw_logprobs"), i.e. the model's own distribution, which is what
beam search scores and what clients compare across sampling settings.
"""

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams, SamplingType


@dataclass
class SamplingMetadata:
    """Per-row sampling state for one step (row i = params[i]).

    temperature: [N] float32, 1.0 on greedy rows (whose filters are neutral too).
    greedy: [N] bool; all_greedy / any_greedy: the same, as Python bools.
    top_k: [N] int64 (V where off), top_p / min_p: [N] float32; None when no row uses it.
    repetition_penalties, presence_penalties, frequency_penalties: [N] float32; None when
        no row is penalized.
    prompt_token_counts / output_token_counts: [N, V] int32 occurrences of each token id
        (prompt counts only when a row has a repetition penalty, output counts when any).
    logit_bias: (rows [B] int64, token_ids [B] int64, biases [B] float32) or None.
    min_tokens_blocked: (rows [M] int64, token_ids [M] int64), the eos/stop ids masked on rows
        that have fewer than min_tokens output tokens, or None.
    seeded_rows: (row, generator) for random rows with their own generator; other random
        rows share one draw from torch's default generator.
    max_num_logprobs: the largest `logprobs` of any row, or None when no row asks.
    """

    temperature: torch.Tensor
    greedy: torch.Tensor
    all_greedy: bool
    any_greedy: bool
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    repetition_penalties: torch.Tensor | None
    presence_penalties: torch.Tensor | None
    frequency_penalties: torch.Tensor | None
    prompt_token_counts: torch.Tensor | None
    output_token_counts: torch.Tensor | None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    min_tokens_blocked: tuple[torch.Tensor, torch.Tensor] | None
    seeded_rows: list[tuple[int, torch.Generator]]
    max_num_logprobs: int | None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        device: torch.device | str,
        vocab_size: int,
        eos_token_ids: list[int | None] | None = None,
    ) -> "SamplingMetadata":
        """Gather the rows' params into device tensors.

        generators[i]: the request's own generator (seeded with params[i].seed and kept by the
        engine across steps, on `device`) or None. eos_token_ids[i]: the eos id that
        min_tokens holds back on row i (None: no eos).
        """
        num_rows = len(params)
        eos_token_ids = [None] * num_rows if eos_token_ids is None else eos_token_ids
        per_row = (prompt_token_ids, output_token_ids, generators, eos_token_ids)
        if any(len(values) != num_rows for values in per_row):
            raise ValueError(
                "prompt_token_ids, output_token_ids, generators and eos_token_ids need one "
                f"entry per row of params ({num_rows})"
            )
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        penalties = _penalties(params, prompt_token_ids, output_token_ids, vocab_size, device)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=_row_tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            top_k=_row_tensor([min(p.top_k, vocab_size) or vocab_size for p in params], device,
                              torch.int64, unless_all=vocab_size),
            top_p=_row_tensor([p.top_p for p in params], device, unless_all=1.0),
            min_p=_row_tensor([p.min_p for p in params], device, unless_all=0.0),
            **penalties,
            logit_bias=_logit_bias(params, vocab_size, device),
            min_tokens_blocked=_min_tokens_blocked(params, output_token_ids, eos_token_ids,
                                                   vocab_size, device),
            seeded_rows=[(i, g) for i, g in enumerate(generators) if g is not None and not greedy[i]],
            max_num_logprobs=min(max(logprobs), vocab_size) if logprobs else None,
        )


@dataclass
class LogprobsTensors:
    """token_ids / logprobs: [M, k] top-k per row (None when k is None); selected_logprobs: [M]."""

    token_ids: torch.Tensor | None
    logprobs: torch.Tensor | None
    selected_logprobs: torch.Tensor


@dataclass
class SamplerOutput:
    """sampled_token_ids: [N] int64. logprob_token_ids / logprobs: [N, k] with k the largest
    `logprobs` in the batch (row i uses its first params[i].logprobs columns), None when no row
    asks. sampled_logprobs: [N] float32, the sampled tokens' logprobs (raw, see module doc)."""

    sampled_token_ids: torch.Tensor
    logprob_token_ids: torch.Tensor | None
    logprobs: torch.Tensor | None
    sampled_logprobs: torch.Tensor


class Sampler:
    """Samples one token per row of a batch in a single vectorized pass."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        sampled = self.sample(self.process_logits(logits, metadata), metadata)
        logprobs = compute_logprobs(logits, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, logprobs.token_ids, logprobs.logprobs, logprobs.selected_logprobs)

    def process_logits(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Everything before the draw, on a copy: [N, V] float32 with filtered tokens at -inf."""
        logits = logits.clone()
        if metadata.logit_bias is not None:
            rows, token_ids, biases = metadata.logit_bias
            logits.index_put_((rows, token_ids), biases, accumulate=True)
        if metadata.min_tokens_blocked is not None:
            logits[metadata.min_tokens_blocked] = float("-inf")
        if metadata.repetition_penalties is not None:
            seen = (metadata.prompt_token_counts + metadata.output_token_counts) > 0
            logits = apply_repetition_penalty(logits, seen, metadata.repetition_penalties)
        if metadata.presence_penalties is not None:
            logits = apply_presence_frequency_penalties(
                logits, metadata.output_token_counts, metadata.presence_penalties,
                metadata.frequency_penalties,
            )
        logits.div_(metadata.temperature.unsqueeze(1))
        if metadata.top_k is not None or metadata.top_p is not None:
            logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        if metadata.min_p is not None:
            logits = apply_min_p(logits, metadata.min_p)
        return logits

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """[N, V] processed logits -> [N] int64 token ids."""
        greedy_ids = logits.argmax(dim=-1) if metadata.any_greedy else None
        if metadata.all_greedy:
            return greedy_ids
        # argmax(p / q) with q ~ Exp(1) picks token t with probability p_t (exponential race);
        # p needs no normalization, and a row's draw depends only on its own generator.
        probs = logits.softmax(dim=-1)
        random_ids = probs.div_(_exponential_noise(probs, metadata.seeded_rows)).argmax(dim=-1)
        if greedy_ids is None:
            return random_ids
        return torch.where(metadata.greedy, greedy_ids, random_ids)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalties: torch.Tensor) -> torch.Tensor:
    """HF semantics on tokens already seen ([N, V] bool): negative logits *= p, others /= p."""
    penalties = penalties.unsqueeze(1)
    penalized = torch.where(logits < 0, logits * penalties, logits / penalties)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalties(logits: torch.Tensor, output_token_counts: torch.Tensor,
                                       presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty."""
    counts = output_token_counts.to(logits.dtype)
    return logits - counts * frequency.unsqueeze(1) - (counts > 0).to(logits.dtype) * presence.unsqueeze(1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Top-k ([N] int64, ties with the k-th value kept) then top-p ([N] float32) with HF's rule:
    drop the tokens whose ascending cumulative probability is <= 1 - top_p, keeping the top one."""
    sorted_logits, sorted_ids = logits.sort(dim=-1)
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (logits.shape[1] - top_k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p ([N]) times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                     num_logprobs: int | None) -> LogprobsTensors:
    """log_softmax of logits [M, V] at token_ids [M], plus the top num_logprobs per row."""
    if num_logprobs is None:
        selected = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)
        return LogprobsTensors(None, None, selected)
    logprobs = logits.log_softmax(dim=-1)
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)
    return LogprobsTensors(top_ids, top_logprobs, logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1))


def compute_prompt_logprobs(prompt_logits: torch.Tensor, prompt_token_ids: list[int] | torch.Tensor,
                            num_logprobs: int) -> LogprobsTensors:
    """Logprobs of prompt tokens from the prompt's logits.

    prompt_logits row i ([P, V] float32) is the model's prediction after prompt_token_ids[i],
    so it scores prompt_token_ids[i + 1]; rows without a next prompt token are dropped. With
    chunked prefill, pass a chunk's logits and the prompt ids from the chunk's first position.
    Returns M = min(P, len(prompt_token_ids) - 1) rows.
    """
    targets = torch.as_tensor(prompt_token_ids, dtype=torch.int64, device=prompt_logits.device)[1:]
    num_rows = min(prompt_logits.shape[0], targets.shape[0])
    return compute_logprobs(prompt_logits[:num_rows], targets[:num_rows], num_logprobs)


def _exponential_noise(probs: torch.Tensor, seeded_rows: list[tuple[int, torch.Generator]]) -> torch.Tensor:
    noise = torch.empty_like(probs)
    if len(seeded_rows) < probs.shape[0]:
        noise.exponential_()
    for row, generator in seeded_rows:
        noise[row].exponential_(generator=generator)
    # A zero draw would turn a zero probability into 0/0 = NaN, which argmax would pick.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _row_tensor(values: list, device, dtype: torch.dtype = torch.float32,
                unless_all=None) -> torch.Tensor | None:
    """[N] tensor of values, or None when every value equals unless_all (the neutral one)."""
    if unless_all is not None and all(v == unless_all for v in values):
        return None
    return torch.tensor(values, dtype=dtype, device=device)


def _token_counts(token_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[N, V] int32 occurrence counts; ids >= V (never sampled) land in a dropped column."""
    width = max((len(ids) for ids in token_ids), default=0)
    padded = torch.tensor([ids + [vocab_size] * (width - len(ids)) for ids in token_ids],
                          dtype=torch.int64, device=device).reshape(len(token_ids), width)
    padded.clamp_(max=vocab_size)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size]


def _penalties(params, prompt_token_ids, output_token_ids, vocab_size, device) -> dict:
    repetition = _row_tensor([p.repetition_penalty for p in params], device, unless_all=1.0)
    presence = [p.presence_penalty for p in params]
    frequency = [p.frequency_penalty for p in params]
    additive = any(presence) or any(frequency)
    repeated = repetition is not None
    return dict(
        repetition_penalties=repetition,
        presence_penalties=_row_tensor(presence, device) if additive else None,
        frequency_penalties=_row_tensor(frequency, device) if additive else None,
        prompt_token_counts=_token_counts(prompt_token_ids, vocab_size, device) if repeated else None,
        output_token_counts=(_token_counts(output_token_ids, vocab_size, device)
                             if repeated or additive else None),
    )


def _logit_bias(params, vocab_size, device):
    entries = [(row, token_id, bias) for row, p in enumerate(params)
               for token_id, bias in (p.logit_bias or {}).items()]
    _check_below_vocab("logit_bias token id", [token_id for _, token_id, _ in entries], vocab_size)
    if not entries:
        return None
    rows, token_ids, biases = zip(*entries)
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(token_ids, dtype=torch.int64, device=device),
            torch.tensor(biases, dtype=torch.float32, device=device))


def _min_tokens_blocked(params, output_token_ids, eos_token_ids, vocab_size, device):
    entries = []
    for row, (p, output, eos) in enumerate(zip(params, output_token_ids, eos_token_ids)):
        if len(output) < p.min_tokens:
            eos_ids = [] if p.ignore_eos or eos is None else [eos]
            entries += [(row, token_id) for token_id in p.stop_token_ids + eos_ids]
    _check_below_vocab("stop_token_ids / eos_token_ids", [token_id for _, token_id in entries], vocab_size)
    if not entries:
        return None
    rows, token_ids = zip(*entries)
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(token_ids, dtype=torch.int64, device=device))


def _check_below_vocab(name: str, token_ids: list[int], vocab_size: int) -> None:
    too_large = [t for t in token_ids if t >= vocab_size]
    if too_large:
        raise ValueError(f"{name} {too_large[0]} is not below the vocab size {vocab_size}")
