"""Per-request sampling parameters (vLLM's names and defaults) and beam search parameters.

Every out-of-range value raises a ValueError whose message starts with the field's name.
"""

import enum
import math
import numbers
from dataclasses import dataclass

# Temperatures below this are treated as greedy decoding (vLLM's threshold).
SAMPLING_EPS = 1e-5

# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1

_BOOL_FIELDS = (
    "include_stop_str_in_output",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "detokenize",
)


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.IntEnum):
    """Which steps give a request's `RequestOutput` (vLLM's names).

    CUMULATIVE: every step the request advances, all text and tokens so far.
    FINAL_ONLY: only the step it finishes (`LLM.generate` asks for this: it
    skips building outputs nobody reads, a per-request cost every step).
    """
    CUMULATIVE = 0
    FINAL_ONLY = 2


def _check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _check_float(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """Finite real number in [low, high], or (low, high] when low_open."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    in_range = (low < value if low_open else low <= value) and value <= high
    if not math.isfinite(value) or not in_range:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return value


def _check_optional_int(name: str, value, minimum: int) -> int | None:
    return None if value is None else _check_int(name, value, minimum)


def _normalize_stop(stop) -> list[str]:
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
    return list(stop)


def _normalize_logit_bias(logit_bias) -> dict[int, float] | None:
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {logit_bias!r}")
    return {
        _check_int("logit_bias token id", token_id, 0): _check_float(
            "logit_bias value", bias, -math.inf, math.inf
        )
        for token_id, bias in logit_bias.items()
    }


@dataclass
class SamplingParams:
    """What a request asks of decoding; names, meanings and defaults follow vLLM.

    top_k 0 or -1 disables top-k (normalized to 0). max_tokens None means up to the model's
    context length. logprobs = k returns the k most likely tokens per generated token plus the
    sampled one. stop is normalized to a list of strings, stop_token_ids to a list of ints.
    Greedy requests (temperature < SAMPLING_EPS) get neutral top_p/top_k/min_p, as in vLLM.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.n = _check_int("n", self.n, 1)
        self.temperature = _check_float("temperature", self.temperature, 0.0, math.inf)
        self.top_p = _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = max(_check_int("top_k", self.top_k, -1), 0)
        self.min_p = _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            self.seed = _check_int("seed", self.seed, _SEED_MIN, _SEED_MAX)
        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.repetition_penalty = _check_float(
            "repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True
        )
        self._check_stops_and_lengths()
        self.logprobs = _check_optional_int("logprobs", self.logprobs, 0)
        self.prompt_logprobs = _check_optional_int("prompt_logprobs", self.prompt_logprobs, 0)
        self.logit_bias = _normalize_logit_bias(self.logit_bias)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.output_kind not in list(RequestOutputKind) or isinstance(self.output_kind, bool):
            raise ValueError(f"output_kind must be one of {[k.name for k in RequestOutputKind]}, "
                             f"got {self.output_kind!r}")
        self.output_kind = RequestOutputKind(self.output_kind)
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if self.sampling_type == SamplingType.GREEDY:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _check_stops_and_lengths(self) -> None:
        self.stop = _normalize_stop(self.stop)
        stop_token_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(stop_token_ids, (list, tuple, set)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
        self.stop_token_ids = [_check_int("stop_token_ids", t, 0) for t in stop_token_ids]
        self.max_tokens = _check_optional_int("max_tokens", self.max_tokens, 1)
        self.min_tokens = _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters: keep beam_width beams, score by length-penalized logprob."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.beam_width = _check_int("beam_width", self.beam_width, 1)
        self.max_tokens = _check_int("max_tokens", self.max_tokens, 1)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        self.temperature = _check_float("temperature", self.temperature, 0.0, math.inf)
        self.length_penalty = _check_float("length_penalty", self.length_penalty, -math.inf, math.inf)
