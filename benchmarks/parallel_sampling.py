"""KV blocks held by n=4 samples of one prompt vs 4 independent requests, same run.

One `--input-len`-token prompt (random ids), `--output-len` sampled tokens per sample, EOS
ignored. pagedllm runs it once as `SamplingParams(n=4)` (the samples fork the prompt's
blocks) and once as 4 independent requests (another prompt of the same length, so no prefix
cache hit helps them: they are admitted together anyway). Prints the peak of KV blocks in
use during each run, after every scheduler step, and their ratio, plus the prompt tokens
each run scheduled. The model is a tiny random-weight Llama built on the fly: block counts
do not depend on the weights.

    python benchmarks/parallel_sampling.py --input-len 512
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from engine import LLM, SamplingParams

VOCAB_SIZE = 512


def make_model(out_dir: str, max_len: int) -> str:
    """A 2-layer random Llama with a word-level tokenizer of VOCAB_SIZE ids (t0, t1, ...)."""
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t1").save_pretrained(out_dir)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_len, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


class StepProbe:
    """Wraps Scheduler.schedule: peak KV blocks in use and prompt tokens scheduled
    (tests/test_parallel_sampling.py measures with it too)."""

    def __init__(self, llm: LLM):
        self.scheduler = llm.llm_engine.scheduler
        self.kv = llm.llm_engine.kv_cache_manager
        self._schedule = self.scheduler.schedule
        self.scheduler.schedule = self
        self.reset()

    def restore(self) -> None:
        self.scheduler.schedule = self._schedule

    def reset(self) -> None:
        self.peak_blocks = 0
        self.prompt_tokens = 0

    def __call__(self):
        output = self._schedule()
        for request in output.scheduled_requests:
            start = request.num_computed_tokens
            end = start + output.num_scheduled_tokens[request.request_id]
            self.prompt_tokens += max(0, min(end, request.num_prompt_tokens) - start)
        self.peak_blocks = max(self.peak_blocks, self.kv.num_blocks - self.kv.num_free_blocks)
        return output


def forked_vs_independent(llm: LLM, vocab_size: int, input_len: int, output_len: int,
                          n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((peak KV blocks, prompt tokens scheduled) of one prompt sampled n times as
    `SamplingParams(n=n)`, the same of n independent requests for another prompt)."""
    probe = StepProbe(llm)
    try:
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(2, vocab_size, (2, input_len), generator=generator).tolist()
        params = dict(max_tokens=output_len, ignore_eos=True, temperature=1.0)
        outputs = llm.generate({"prompt_token_ids": prompts[0]},
                               SamplingParams(n=n, seed=0, **params), use_tqdm=False)
        assert [len(c.token_ids) for c in outputs[0].outputs] == [output_len] * n
        forked = (probe.peak_blocks, probe.prompt_tokens)
        probe.reset()
        llm.generate([{"prompt_token_ids": prompts[1]}] * n,
                     [SamplingParams(seed=i, **params) for i in range(n)], use_tqdm=False)
        return forked, (probe.peak_blocks, probe.prompt_tokens)
    finally:
        probe.restore()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as model_dir:
        make_model(model_dir, args.input_len + args.output_len)
        llm = LLM(model=model_dir, device="cpu", dtype="float32", block_size=args.block_size)
        forked, independent = forked_vs_independent(llm, VOCAB_SIZE, args.input_len,
                                                    args.output_len, args.n)
    print(f"{args.n} samples of one {args.input_len}-token prompt, {args.output_len} tokens "
          f"each, block_size {args.block_size}")
    print(f"{'':>24} {'peak KV blocks':>15} {'prompt tokens scheduled':>24}")
    print(f"{'n=' + str(args.n) + ' (forked)':>24} {forked[0]:>15} {forked[1]:>24}")
    print(f"{str(args.n) + ' independent requests':>24} {independent[0]:>15} "
          f"{independent[1]:>24}")
    print(f"blocks ratio independent / forked: {independent[0] / forked[0]:.2f}")


if __name__ == "__main__":
    main()
