"""Stop strings through the engine: inside one token, across tokens, in multi-byte output.

Expectations come from the same request without the stop string: the stopped completion's
token_ids are the shortest prefix of the unstopped ones whose decoding contains the stop,
and its text is that decoding cut before the stop's first occurrence (after it with
include_stop_str_in_output). Multi-byte output is forced with a logit bias on the two byte
tokens of "ü" and on "!" and "x" (plus frequency/presence penalties so they alternate).
"""

from __future__ import annotations

import pytest

from cpu_threads import single_torch_thread  # noqa: F401
from engine import LLM, SamplingParams
from tiny_models import tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_TOKENS = 24
#: prompts whose completions (greedy; biased to multi-byte) decode without a trailing
#: incomplete character, which the detokenizer would hold back
PROMPT = "The capital of France is"
MULTI_BYTE_PROMPT = "Hello"


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    return LLM(model=str(tiny_model_factory("llama")), device="cpu", dtype="float32")


def multi_byte_params(tokenizer, **kwargs) -> SamplingParams:
    biased = tokenizer.encode("ü!x", add_special_tokens=False)
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                          logit_bias={token_id: 100.0 for token_id in biased},
                          frequency_penalty=2.0, presence_penalty=2.0, **kwargs)


def token_spans(tokenizer, token_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each token's text in the decoding of all of them."""
    ends = [len(tokenizer.decode(token_ids[:i + 1])) for i in range(len(token_ids))]
    return list(zip([0] + ends[:-1], ends))


def find_stop(tokenizer, token_ids: list[int], where: str) -> str:
    """A stop string whose first occurrence lies strictly inside one token, or spans the
    boundary between two tokens."""
    text = tokenizer.decode(token_ids)
    for start, end in token_spans(tokenizer, token_ids):
        if where == "inside" and end - start >= 3:
            stop, offset = text[start + 1:end - 1], start + 1
        elif where == "across" and 0 < start and end > start:
            stop, offset = text[start - 1:start + 1], start - 1
        else:
            continue
        if stop.strip() and text.index(stop) == offset:
            return stop
    raise AssertionError(f"no stop string {where} a token in {text!r}")


def expected(tokenizer, token_ids: list[int], stop: str, include: bool):
    for length in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:length])
        if stop in text:
            end = text.index(stop) + (len(stop) if include else 0)
            return token_ids[:length], text[:end]
    raise AssertionError(f"{stop!r} is not in {tokenizer.decode(token_ids)!r}")


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("case", ["inside", "across", "multi-byte char", "after multi-byte"])
def test_stop_string(llm, case, include):
    tokenizer = llm.get_tokenizer()
    if case in ("inside", "across"):
        prompt, params = PROMPT, dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        make = lambda **kw: SamplingParams(**params, **kw)  # noqa: E731
    else:
        prompt = MULTI_BYTE_PROMPT
        make = lambda **kw: multi_byte_params(tokenizer, **kw)  # noqa: E731
    (full,) = llm.generate(prompt, make(), use_tqdm=False)
    full_ids = full.outputs[0].token_ids
    assert full.outputs[0].text == tokenizer.decode(full_ids)
    if case == "multi-byte char":
        stop = "üx"
    elif case == "after multi-byte":
        stop = "xx"
    else:
        stop = find_stop(tokenizer, full_ids, case)
    if "multi-byte" in case:
        assert "ü" in tokenizer.decode(expected(tokenizer, full_ids, stop, True)[0])
        assert any("\ufffd" in tokenizer.decode([t]) for t in full_ids), "bytes of a char"
    (output,) = llm.generate(prompt, make(stop=[stop], include_stop_str_in_output=include),
                             use_tqdm=False)
    completion = output.outputs[0]
    want_ids, want_text = expected(tokenizer, full_ids, stop, include)
    assert completion.token_ids == want_ids
    assert completion.text == want_text
    assert completion.finish_reason == "stop" and completion.stop_reason == stop


def test_multi_byte_output_is_decoded_whole(llm):
    tokenizer = llm.get_tokenizer()
    (output,) = llm.generate(MULTI_BYTE_PROMPT, multi_byte_params(tokenizer), use_tqdm=False)
    completion = output.outputs[0]
    assert "ü" in completion.text and completion.text.count("ü") >= 2
    assert completion.text == tokenizer.decode(completion.token_ids)


def test_stop_strings_with_parallel_samples(llm):
    """Each sample stops at its own first occurrence of the stop string."""
    tokenizer = llm.get_tokenizer()
    params = dict(n=3, temperature=1.0, seed=9, max_tokens=MAX_TOKENS, ignore_eos=True)
    (full,) = llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)
    stop = " "
    assert any(stop in completion.text for completion in full.outputs)
    (output,) = llm.generate(PROMPT, SamplingParams(**params, stop=[stop]), use_tqdm=False)
    for unstopped, completion in zip(full.outputs, output.outputs):
        if stop not in unstopped.text:
            assert completion.token_ids == unstopped.token_ids
            continue
        want_ids, want_text = expected(tokenizer, unstopped.token_ids, stop, False)
        assert (completion.token_ids, completion.text) == (want_ids, want_text)
