"""`LLM.beam_search` equals HF `generate(num_beams=k, do_sample=False, early_stopping=True)`.

The tiny models get an eos that is often a top candidate (its output row points along the
mean final hidden state), so some hypotheses finish early, by eos, and others at max_tokens.
Every hypothesis of every prompt is compared (HF returns all k with num_return_sequences=k):
tokens exactly, scores (cum_logprob / num_generated ** length_penalty) to 1e-4. Afterwards
no KV block is held; while searching, beams share their prompt's blocks.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.parallel_sampling import StepProbe
from cpu_threads import single_torch_thread  # noqa: F401
from engine import LLM
from engine.beam_search import BeamSearchOutput
from engine.kv_cache_manager import cdiv
from engine.sampling_params import BeamSearchParams
from tiny_models import hf_reference_model, tiny_model_factory  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PROMPTS = ["The capital of France is", "Hello", "def add(a, b):", "Once upon a time"]
MAX_TOKENS = 10
#: eos logit relative to the mean top logit of random text
EOS_STRENGTH = 0.95


def make_eos_prone(model_dir, out_dir):
    """A copy of a tiny model whose eos output row follows the mean final hidden state."""
    out_dir = shutil.copytree(model_dir, out_dir)
    model = hf_reference_model(out_dir)
    eos = AutoTokenizer.from_pretrained(out_dir).eos_token_id
    ids = torch.randint(4, model.config.vocab_size, (8, 30),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = out.hidden_states[-1].flatten(0, 1)
        direction = hidden.mean(0) / hidden.mean(0).norm()
        scale = out.logits.max(-1).values.mean() / (hidden @ direction).mean()
        model.get_output_embeddings().weight[eos] = EOS_STRENGTH * scale * direction
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def eos_prone_model(tiny_model_factory, tmp_path_factory):
    cache = {}

    def build(name):
        if name not in cache:
            cache[name] = make_eos_prone(tiny_model_factory(name),
                                         tmp_path_factory.mktemp(name) / "eos-prone")
        return cache[name]

    return build


def hf_beam_search(model_dir, prompts, beam_width, length_penalty):
    """Per prompt: (sequences [k, L] with the prompt, scores [k]) from HF."""
    model = hf_reference_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), num_beams=beam_width,
                do_sample=False, early_stopping=True, length_penalty=length_penalty,
                max_new_tokens=MAX_TOKENS, num_return_sequences=beam_width,
                output_scores=True, return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id)
        results.append((out.sequences.tolist(), out.sequences_scores.tolist()))
    return results, tokenizer.pad_token_id


def assert_equals_hf(outputs: list[BeamSearchOutput], expected, pad_token_id, length_penalty,
                     eos_token_id):
    num_prompt_tokens = []
    for output, (hf_sequences, hf_scores) in zip(outputs, expected):
        assert len(output.sequences) == len(hf_sequences)
        for rank, (seq, hf_seq, hf_score) in enumerate(zip(output.sequences, hf_sequences,
                                                            hf_scores)):
            assert seq.tokens + [pad_token_id] * (len(hf_seq) - len(seq.tokens)) == hf_seq, rank
            generated = len(seq.logprobs)
            score = seq.cum_logprob / generated ** length_penalty
            assert score == pytest.approx(hf_score, abs=1e-4)
            chosen = [seq.tokens[-generated + i] for i in range(generated)]
            assert seq.cum_logprob == pytest.approx(
                sum(lp[t].logprob for lp, t in zip(seq.logprobs, chosen)), abs=1e-5)
            assert seq.finish_reason == ("stop" if chosen[-1] == eos_token_id else "length")
        num_prompt_tokens.append(len(hf_sequences[0]) - MAX_TOKENS)
    return num_prompt_tokens


def used_blocks(llm) -> int:
    kv = llm.llm_engine.kv_cache_manager
    return kv.num_blocks - kv.num_free_blocks


def engine_kwargs(variant: str, beam_width: int) -> dict:
    """Plenty of room; or a KV pool so small that beams are preempted and recomputed, with
    8-token steps (chunked prefill, and a prompt's beams split across steps)."""
    if variant == "roomy":
        return dict(block_size=4)
    return dict(block_size=4, num_gpu_blocks_override=5 * beam_width,
                max_num_batched_tokens=16, max_num_seqs=16)


class ForkCounter:
    """Wraps Scheduler.fork_request: beams grown by a token, and beams cloned (same tokens)
    because only some of their prompt's beams ran in a step."""

    def __init__(self, scheduler):
        self.fork_request = scheduler.fork_request
        scheduler.fork_request = self
        self.num_grown = self.num_cloned = 0

    def __call__(self, parent, child):
        if child.num_tokens == parent.num_tokens:
            self.num_cloned += 1
        else:
            self.num_grown += 1
        return self.fork_request(parent, child)


@pytest.mark.parametrize("variant", ["roomy", "tight"])
@pytest.mark.parametrize("beam_width, length_penalty", [(2, 1.0), (4, 1.0), (4, 0.5), (2, 2.0)])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_beam_search_equals_hf(eos_prone_model, name, beam_width, length_penalty, variant):
    model_dir = eos_prone_model(name)
    expected, pad_token_id = hf_beam_search(model_dir, PROMPTS, beam_width, length_penalty)
    llm = LLM(model=str(model_dir), device="cpu", dtype="float32",
              **engine_kwargs(variant, beam_width))
    forks = ForkCounter(llm.llm_engine.scheduler)
    params = BeamSearchParams(beam_width=beam_width, max_tokens=MAX_TOKENS,
                              length_penalty=length_penalty)
    outputs = llm.beam_search(PROMPTS, params)
    eos = llm.get_tokenizer().eos_token_id
    assert_equals_hf(outputs, expected, pad_token_id, length_penalty, eos)
    finish_reasons = {seq.finish_reason for out in outputs for seq in out.sequences}
    assert finish_reasons == {"stop", "length"}, "both ways of finishing must be exercised"
    assert used_blocks(llm) == 0
    assert not llm.llm_engine.scheduler.has_unfinished_requests()
    assert forks.num_grown >= len(PROMPTS) * beam_width
    if variant == "tight":
        assert llm.llm_engine.num_preemptions > 0 and forks.num_cloned > 0


def test_beams_share_the_prompt_blocks(eos_prone_model):
    """A 100-token prompt, 4 beams: the peak of blocks in use stays far below 4 copies."""
    llm = LLM(model=str(eos_prone_model("llama")), device="cpu", dtype="float32",
              block_size=4)
    probe = StepProbe(llm)
    prompt = {"prompt_token_ids": list(range(4, 104))}
    (output,) = llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS,
                                                           ignore_eos=True))
    assert [len(s.tokens) for s in output.sequences] == [100 + MAX_TOKENS] * 4
    own_blocks = cdiv(100 + MAX_TOKENS, 4)
    assert own_blocks <= probe.peak_blocks <= own_blocks + 4 * 2 * cdiv(MAX_TOKENS, 4)
    assert probe.prompt_tokens == 100
    assert used_blocks(llm) == 0


def test_text_and_output_order(eos_prone_model):
    llm = LLM(model=str(eos_prone_model("llama")), device="cpu", dtype="float32")
    params = BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True)
    outputs = llm.beam_search(PROMPTS[:2], params)
    tokenizer = llm.get_tokenizer()
    for prompt, output in zip(PROMPTS, outputs):
        assert [s.tokens[:len(tokenizer.encode(prompt))] for s in output.sequences] == \
            [tokenizer.encode(prompt)] * 3
        assert [s.text for s in output.sequences] == \
            [tokenizer.decode(s.tokens) for s in output.sequences]
        scores = [s.cum_logprob for s in output.sequences]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("field, kwargs, prompts", [
    ("beam_width", dict(beam_width=300, max_tokens=4), ["Hello"]),
    ("max_tokens", dict(beam_width=2, max_tokens=300), ["Hello"]),
    ("prompts\\[1\\]", dict(beam_width=2, max_tokens=4), ["Hello", ""]),
])
def test_bad_input_is_a_value_error(eos_prone_model, field, kwargs, prompts):
    llm = LLM(model=str(eos_prone_model("llama")), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=field):
        llm.beam_search(prompts, BeamSearchParams(**kwargs))
    assert used_blocks(llm) == 0 and not llm.llm_engine.scheduler.has_unfinished_requests()
