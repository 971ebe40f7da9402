"""SamplingParams / BeamSearchParams: vLLM defaults, normalization, and validation naming the field."""

import math

import pytest

from engine.sampling_params import BeamSearchParams, SamplingParams, SamplingType


def test_defaults_are_vllm_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.stop, p.stop_token_ids, p.include_stop_str_in_output, p.ignore_eos) == ([], [], False, False)
    assert (p.max_tokens, p.min_tokens, p.logprobs) == (16, 0, None)
    assert (p.prompt_logprobs, p.logit_bias) == (None, None)
    assert (p.skip_special_tokens, p.spaces_between_special_tokens, p.detokenize) == (True, True, True)
    assert p.sampling_type == SamplingType.RANDOM


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0), ("n", 1.5), ("n", True),
        ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan), ("top_p", -0.5),
        ("top_k", -2), ("top_k", 2.5),
        ("min_p", -0.01), ("min_p", 1.01), ("min_p", math.nan),
        ("seed", "x"), ("seed", 1.0), ("seed", 2**64),
        ("presence_penalty", 2.01), ("presence_penalty", -2.01), ("presence_penalty", math.nan),
        ("frequency_penalty", 2.5), ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
        ("stop", [""]), ("stop", ""), ("stop", [1]), ("stop", 7),
        ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", 5),
        ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
        ("min_tokens", -1),
        ("logprobs", -1), ("logprobs", 1.5),
        ("prompt_logprobs", -1),
        ("logit_bias", {-1: 1.0}), ("logit_bias", {"3": 1.0}), ("logit_bias", {3: math.nan}),
        ("logit_bias", [1.0]),
        ("include_stop_str_in_output", 1), ("ignore_eos", "yes"), ("skip_special_tokens", None),
        ("spaces_between_special_tokens", 0), ("detokenize", "no"),
        ("output_kind", "FINAL_ONLY"), ("output_kind", 7), ("output_kind", True),
    ],
)
def test_invalid_value_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_names_min_tokens():
    with pytest.raises(ValueError, match=r"^min_tokens\b"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=5).min_tokens == 5


def test_stop_strings_need_detokenize():
    with pytest.raises(ValueError, match=r"^stop\b.*detokenize"):
        SamplingParams(stop="x", detokenize=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-9), dict(min_p=0.0), dict(min_p=1.0),
        dict(top_k=-1), dict(top_k=1), dict(max_tokens=None), dict(max_tokens=1, min_tokens=1),
        dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(repetition_penalty=1e-3),
        dict(logprobs=0, prompt_logprobs=0), dict(seed=-1), dict(seed=2**64 - 1),
        dict(logit_bias={0: -100.0, 5: 100}), dict(temperature=2),
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_normalization():
    p = SamplingParams(stop="###", stop_token_ids=(7, 9), top_k=-1, temperature=1)
    assert p.stop == ["###"] and p.stop_token_ids == [7, 9] and p.top_k == 0
    assert isinstance(p.temperature, float)


@pytest.mark.parametrize(
    "temperature, seed, expected",
    [(0.0, None, SamplingType.GREEDY), (1e-6, 3, SamplingType.GREEDY),
     (0.7, None, SamplingType.RANDOM), (0.7, 3, SamplingType.RANDOM_SEED)],
)
def test_sampling_type(temperature, seed, expected):
    assert SamplingParams(temperature=temperature, seed=seed).sampling_type == expected


def test_greedy_neutralizes_filters():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)


@pytest.mark.parametrize(
    "field, value",
    [("beam_width", 0), ("beam_width", 2.0), ("max_tokens", 0), ("ignore_eos", 1),
     ("temperature", -1.0), ("temperature", math.nan), ("length_penalty", math.inf)],
)
def test_beam_search_params_invalid_value_names_field(field, value):
    kwargs = dict(beam_width=2, max_tokens=8)
    kwargs[field] = value
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        BeamSearchParams(**kwargs)


def test_beam_search_params_defaults():
    p = BeamSearchParams(beam_width=4, max_tokens=32)
    assert (p.ignore_eos, p.temperature, p.length_penalty) == (False, 0.0, 1.0)
