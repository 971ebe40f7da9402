"""The offline API around the engine: bad input, output order, chat, stops, seeds, CLI.

Bad input is a ValueError naming the field, raised before anything of the
batch runs, and the same LLM keeps serving: its next results equal those of
a fresh run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import weakref

import pytest
import torch

from engine import LLM, CompletionOutput, RequestOutput, RequestOutputKind, SamplingParams
from engine.cli import main as cli_main
from engine.request import RequestStatus
from cpu_threads import single_torch_thread  # noqa: F401
from tiny_models import tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PROMPTS = ["The capital of France is", "Hello", "def add(a, b):\n", "Once upon a time there"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    """float32: its greedy tokens are compared across batches, where bfloat16's ties differ."""
    return LLM(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64)


@pytest.fixture(scope="module")
def expected(llm):
    """Greedy outputs of PROMPTS from a batch that had nothing wrong in it."""
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def completions(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- bad input ------------------------------------------------------------------

def test_unknown_model_path(tmp_path):
    with pytest.raises(ValueError, match="model"):
        LLM(model=str(tmp_path / "no-such-model"), device="cpu")


def test_unsupported_architecture(model_dir, tmp_path):
    bad_dir = shutil.copytree(model_dir, tmp_path / "bad")
    config = json.loads((bad_dir / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM"]
    (bad_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures.*LlamaForCausalLM"):
        LLM(model=str(bad_dir), device="cpu")


@pytest.mark.parametrize("field, kwargs", [
    ("max_tokens", dict(max_tokens=0)),
    ("temperature", dict(temperature=-0.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
])
def test_bad_sampling_params(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field, bad_prompt", [
    ("max_model_len", {"prompt_token_ids": [5] * 65}),
    ("max_model_len", "The capital of France is " * 30),
    ("prompt", ""),
    ("prompt_token_ids", {"prompt_token_ids": []}),
    ("prompt_token_ids", {"prompt_token_ids": [1, 10**6]}),
    ("prompt", 42),
])
def test_bad_prompt_rejects_the_batch_and_the_llm_keeps_serving(llm, expected, field,
                                                                 bad_prompt):
    batch = PROMPTS[:2] + [bad_prompt] + PROMPTS[2:]
    with pytest.raises(ValueError, match=field) as excinfo:
        llm.generate(batch, GREEDY, use_tqdm=False)
    assert "prompts[2]" in str(excinfo.value)
    assert not llm.llm_engine.has_unfinished_requests()
    assert completions(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected


def test_sampling_params_count_must_match(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(PROMPTS, [GREEDY] * 3, use_tqdm=False)


def test_bad_request_mid_flight_leaves_running_requests_alone(llm, expected):
    engine = llm.llm_engine
    engine.add_request("good", PROMPTS[0], GREEDY)
    engine.step()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("bad", {"prompt_token_ids": [5] * 100}, GREEDY)
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("good", PROMPTS[1], GREEDY)
    final = None
    while engine.has_unfinished_requests():
        final = {o.request_id: o for o in engine.step()}.get("good", final)
    assert final.finished and final.outputs[0].token_ids == expected[0]


def test_unavailable_device_names_the_hardware():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so device='cuda' is available")
    with pytest.raises(ValueError, match="device"):
        LLM(device="cuda")


# ---- outputs --------------------------------------------------------------------

def test_outputs_follow_input_order(llm):
    # Long generations first, so they finish after the short ones behind them.
    prompts = [{"prompt_token_ids": [7] * n} for n in (30, 3, 12, 1)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in (12, 1, 6, 2)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == [p["prompt_token_ids"] for p in prompts]
    assert [len(o.outputs[0].token_ids) for o in outputs] == [12, 1, 6, 2]
    assert all(isinstance(o.outputs[0], CompletionOutput) for o in outputs)
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * 4


def test_single_prompt_and_text_fields(llm, expected):
    (output,) = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    completion = output.outputs[0]
    tokenizer = llm.get_tokenizer()
    assert output.prompt == PROMPTS[0]
    assert output.prompt_token_ids == tokenizer.encode(PROMPTS[0])
    assert completion.token_ids == expected[0]
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert completion.index == 0 and output.finished


def test_stop_string_cuts_text_and_finishes(llm, expected):
    tokenizer = llm.get_tokenizer()
    full_text = tokenizer.decode(expected[3], skip_special_tokens=True)
    stop = full_text[len(full_text) // 2:][:2]
    assert stop.strip(), f"need a visible stop string, got {stop!r} from {full_text!r}"
    params = SamplingParams(temperature=0.0, max_tokens=8, stop=[stop])
    (output,) = llm.generate(PROMPTS[3], params, use_tqdm=False)
    completion = output.outputs[0]
    assert completion.text == full_text[:full_text.index(stop)]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert len(completion.token_ids) < 8 or stop in tokenizer.decode(completion.token_ids)


def test_stop_token_id_is_the_stop_reason(llm, expected):
    stop_id = expected[1][2]
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_id])
    (output,) = llm.generate(PROMPTS[1], params, use_tqdm=False)
    completion = output.outputs[0]
    assert completion.token_ids == expected[1][:expected[1].index(stop_id) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=1234, ignore_eos=True)
    (alone,) = llm.generate(PROMPTS[0], params, use_tqdm=False)
    others = [SamplingParams(temperature=0.8, max_tokens=5)] * 3
    batch = llm.generate(PROMPTS[1:] + PROMPTS[:1], others + [params], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, max_tokens=8, seed=4321, ignore_eos=True)
    (different,) = llm.generate(PROMPTS[0], other_seed, use_tqdm=False)
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


def test_logprobs_of_greedy_tokens(llm, expected):
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)
    (output,) = llm.generate(PROMPTS[2], params, use_tqdm=False)
    completion = output.outputs[0]
    assert completion.token_ids == expected[2]
    assert len(completion.logprobs) == len(completion.token_ids)
    total = 0.0
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        assert len(position) == 3
        best = max(position.values(), key=lambda lp: lp.logprob)
        assert position[token_id] is best and best.rank == 1 and best.logprob <= 0
        total += best.logprob
    assert completion.cumulative_logprob == pytest.approx(total)


def test_a_deleted_llm_frees_its_model_and_kv_cache(model_dir):
    """A process may build several LLMs in turn (tests, benchmarks): dropping one must free
    its weights and KV pool, or the next one finds the memory taken."""
    llm = LLM(model=str(model_dir), device="cpu", max_model_len=64)
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    runner = llm.llm_engine.model_runner
    model, key_cache = weakref.ref(runner.model), weakref.ref(runner.kv_caches[0][0])
    del llm, runner
    gc.collect()
    assert model() is None and key_cache() is None


def test_abort_request(llm):
    engine = llm.llm_engine
    engine.add_request("aborted", PROMPTS[0], SamplingParams(max_tokens=8))
    engine.step()
    engine.abort_request("aborted")
    assert not engine.has_unfinished_requests()
    assert "aborted" not in engine.scheduler.requests
    assert engine.kv_cache_manager.get_block_ids("aborted") == []


@pytest.mark.parametrize("stop", [None, ["zzz-never"]])
def test_final_only_outputs_once_and_equal_to_cumulative(llm, stop):
    """FINAL_ONLY (what `generate` asks for) skips the per-step outputs, not their content:
    one output per request, on its last step, equal to the last cumulative output."""
    engine = llm.llm_engine
    prompts = {"cumulative": PROMPTS[0], "final": PROMPTS[0], "final-short": PROMPTS[1]}
    kinds = {"cumulative": RequestOutputKind.CUMULATIVE, "final": RequestOutputKind.FINAL_ONLY,
             "final-short": RequestOutputKind.FINAL_ONLY}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(
            temperature=0.0, max_tokens=3 if request_id == "final-short" else 8, stop=stop,
            logprobs=1, output_kind=kinds[request_id]))
    seen: dict[str, list[RequestOutput]] = {request_id: [] for request_id in prompts}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
    assert len(seen["cumulative"]) == 8 and len(seen["final"]) == len(seen["final-short"]) == 1
    assert seen["final"][0].finished and seen["final-short"][0].finished
    assert seen["final"][0] == dataclasses.replace(seen["cumulative"][-1], request_id="final")
    assert len(seen["final-short"][0].outputs[0].token_ids) == 3


# ---- chat -----------------------------------------------------------------------

def test_chat_applies_the_template(llm):
    conversation = [{"role": "user", "content": "Hello, how are you?"}]
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    (output,) = llm.chat(conversation, GREEDY, use_tqdm=False)
    assert output.prompt == text
    assert output.prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    assert output.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    (same,) = llm.generate({"prompt_token_ids": output.prompt_token_ids}, GREEDY,
                           use_tqdm=False)
    assert same.outputs[0].token_ids == output.outputs[0].token_ids


def test_chat_batch_of_conversations(llm):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    assert [o.prompt.count(p) for o, p in zip(outputs, PROMPTS)] == [1] * len(PROMPTS)


def test_chat_without_template(llm, monkeypatch):
    monkeypatch.setattr(llm.get_tokenizer(), "chat_template", None)
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)


# ---- the CLI --------------------------------------------------------------------

def test_cli_generate_prints_completions(model_dir, capsys, expected, llm):
    code = cli_main(["generate", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32",
                     "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    tokenizer = llm.get_tokenizer()
    for prompt, token_ids in zip(PROMPTS[:2], expected[:2]):
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        assert f"Prompt: {prompt!r}\nCompletion: {text!r}" in out


def test_cli_prompts_file_and_bad_input(model_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Hello\n\nThe capital of France is\n")
    assert cli_main(["generate", "--model", str(model_dir), "--prompts-file",
                     str(prompts_file), "--max-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("Prompt: ") == 2
    assert cli_main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "model" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(model_dir), "--prompts-file",
                     str(tmp_path / "missing.txt")]) == 2
    assert "--prompts-file" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert "--max-tokens" in help_text and "--prompts-file" in help_text


def test_finish_requests_status_is_reported(llm):
    engine = llm.llm_engine
    engine.add_request("r", PROMPTS[1], SamplingParams(max_tokens=8))
    engine.step()
    engine.scheduler.finish_requests(["r"], RequestStatus.FINISHED_STOPPED)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "stop"
