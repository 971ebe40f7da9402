"""Hugging Face baselines of the GPU throughput benchmark: static batches and continuous batching.

Both take `prompts` (lists of token ids) and `output_lens` (the exact number
of tokens each prompt must produce; EOS never stops a sequence) and return
(output tok/s, seconds). Only each sequence's own `output_lens[i]` tokens
count, whatever the batch generated beyond them.

- `hf_static`: `model.generate` over consecutive batches of `batch_size`,
  left-padded, greedy; a batch runs to its longest output (min_new_tokens =
  max_new_tokens), as a static-batching server must.
- `hf_continuous`: transformers' continuous batching manager
  (`attn_implementation="paged|sdpa"`), one request per prompt with its own
  max_new_tokens; timed after the manager's warm-up. (Not under inference_mode:
  the manager's thread updates its tensors in place under no_grad.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

#: an id no model emits: with it as eos_token_id generation never stops early
NO_EOS = -1


def complete_index(model_dir: str) -> None:
    """Give a sharded checkpoint's index the "metadata" entry transformers requires."""
    index_path = Path(model_dir) / "model.safetensors.index.json"
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    if "metadata" not in index:
        total = sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))
        index["metadata"] = {"total_size": total}
        index_path.write_text(json.dumps(index))


def _load(model_dir: str, attn_implementation: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 attn_implementation=attn_implementation)
    return model.to("cuda").eval()


def _left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.cuda(), mask.cuda()


@torch.inference_mode()
def hf_static(model_dir: str, prompts: list[list[int]], output_lens: list[int],
              batch_size: int, max_batches: int | None = None) -> tuple[float, float]:
    """Static batches; with `max_batches`, only the first that many are run and counted."""
    model = _load(model_dir, "sdpa")
    pad_id = 0

    def run(batch: list[list[int]], new_tokens: int) -> None:
        ids, mask = _left_padded(batch, pad_id)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad_id)
        assert out.shape[1] == ids.shape[1] + new_tokens

    run(prompts[:batch_size], 8)  # warm-up: kernels, cuBLAS handles
    torch.cuda.synchronize()
    starts = list(range(0, len(prompts), batch_size))[:max_batches]
    counted = 0
    started = time.perf_counter()
    for start in starts:
        lens = output_lens[start:start + batch_size]
        run(prompts[start:start + batch_size], max(lens))
        counted += sum(lens)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    del model
    torch.cuda.empty_cache()
    return counted / elapsed, elapsed


def hf_continuous(model_dir: str, prompts: list[list[int]],
                  output_lens: list[int]) -> tuple[float, float]:
    model = _load(model_dir, "paged|sdpa")
    config = GenerationConfig(do_sample=False, max_new_tokens=max(output_lens),
                              eos_token_id=NO_EOS, pad_token_id=0)
    with model.continuous_batching_context_manager(generation_config=config, block=True,
                                                   timeout=10) as manager:
        started = time.perf_counter()
        for i, (prompt, num_tokens) in enumerate(zip(prompts, output_lens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=num_tokens,
                                eos_token_id=NO_EOS)
        counted, done = 0, 0
        while done < len(prompts):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous batching manager stopped early")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"request {result.request_id}: {result.error}")
                counted += len(result.generated_tokens)
                done += 1
        elapsed = time.perf_counter() - started
    del model
    torch.cuda.empty_cache()
    return counted / elapsed, elapsed
