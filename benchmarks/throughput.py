"""Offline throughput: pagedllm `LLM.generate` vs Hugging Face `generate`, same run.

Both get the same random prompts (`--num-prompts` x `--input-len` token ids)
and must emit exactly `--output-len` greedy tokens each (EOS ignored).
pagedllm takes all prompts at once (continuous batching), once per
`--dtypes`; HF runs static batches of `--hf-batch-size` with left padding,
once per `--hf-dtypes` (both default to float32 and bfloat16). Prints output
tokens/s of each run and each pagedllm run's ratio to each HF run, for each
model: the default model, and a tiny random-weight Llama built on the fly
(engine overhead dominates there). A last line compares the two engines at
their defaults: pagedllm's `dtype="auto"` (bfloat16 on a CPU that multiplies
it natively, else float32) against HF `from_pretrained` without a dtype
(the checkpoint's, float32 for the default model).
Each run also prints its CPU use, CPU time / (wall time x threads): well
below 1, the run shared its cores with other processes and its tok/s is
low; tok/s / CPU use (tokens per second of CPU time a thread) is less
sensitive to that sharing, though not immune (caches are shared too).

    python benchmarks/throughput.py --device cpu [--threads 1]

With `--device cuda` it runs the GPU benchmark of `throughput_cuda.py`
instead (Llama-3.2-1B-shaped model, fixed and varied workloads, HF static
and continuous batching baselines, decode-step profile):

    python benchmarks/throughput.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM)

import throughput_cuda
import platforms
from engine import LLM, SamplingParams
from engine.model_loader import resolve_dtype, resolve_model


def make_tiny_model(tokenizer_dir: str, out_dir: str) -> str:
    """A 4-layer random Llama sharing the default model's tokenizer (and vocab)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def random_prompts(vocab_size: int, num_prompts: int, input_len: int,
                   seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Skip the low ids, where tokenizers keep their special tokens.
    ids = torch.randint(100, vocab_size, (num_prompts, input_len), generator=generator)
    return ids.tolist()


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds / (wall seconds x torch threads)) of `run()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu / (wall * torch.get_num_threads())


def bench_pagedllm(model_dir: str, prompts, warmup_prompts, output_len: int,
                   device: str, dtype: str) -> tuple[float, float, torch.dtype]:
    """(output tok/s, CPU use, the dtype the engine resolved `dtype` to)."""
    llm = LLM(model=model_dir, device=device, dtype=dtype)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    # Warm up on other prompts: the timed ones must not hit the prefix cache.
    llm.generate([{"prompt_token_ids": p} for p in warmup_prompts], params, use_tqdm=False)
    outputs = []
    elapsed, cpu_use = timed(lambda: outputs.extend(llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)))
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return len(prompts) * output_len / elapsed, cpu_use, llm.llm_engine.model_runner.dtype


@torch.inference_mode()
def bench_hf(model_dir: str, prompts, warmup_prompts, output_len: int, batch_size: int,
             device: str, dtype: str) -> tuple[float, float]:
    """(output tok/s, CPU use) of HF `generate` over static batches of `batch_size`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id

    def run(batch: list[list[int]]) -> None:
        padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        out = model.generate(**padded.to(device), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False,
                             pad_token_id=pad_id)
        assert out.shape[1] - padded["input_ids"].shape[1] == output_len

    def run_all() -> None:
        for i in range(0, len(prompts), batch_size):
            run(prompts[i:i + batch_size])

    run(warmup_prompts)
    elapsed, cpu_use = timed(run_all)
    return len(prompts) * output_len / elapsed, cpu_use


def bench_cpu_model(name: str, model_dir: str, args) -> None:
    """pagedllm in each of `args.dtypes` against HF in each of `args.hf_dtypes`, as a table."""
    vocab_size = len(AutoTokenizer.from_pretrained(model_dir))
    prompts = random_prompts(vocab_size, args.num_prompts, args.input_len)
    warmup = random_prompts(vocab_size, 2, args.input_len, seed=1)
    load_before = os.getloadavg()[0]
    hf_runs = {dtype: bench_hf(model_dir, prompts, warmup, args.output_len,
                               args.hf_batch_size, args.device, dtype)
               for dtype in args.hf_dtypes}
    rows = [(f"HF generate, {dtype}, batch {args.hf_batch_size}", tok_s, cpu_use, "")
            for dtype, (tok_s, cpu_use) in hf_runs.items()]
    paged_runs = {}
    for dtype in args.dtypes:
        tok_s, cpu_use, resolved = bench_pagedllm(model_dir, prompts, warmup, args.output_len,
                                                  args.device, dtype)
        paged_runs[resolved] = tok_s
        ratios = "  ".join(f"/ HF {hf_dtype}: {tok_s / hf_tok_s:.2f}x"
                           for hf_dtype, (hf_tok_s, _) in hf_runs.items())
        rows.append((f"pagedllm, {dtype} ({str(resolved).removeprefix('torch.')})", tok_s,
                     cpu_use, ratios))
    print(f"\n{name}: {args.num_prompts} prompts x {args.input_len} in / {args.output_len} "
          f"out, threads={torch.get_num_threads()}, load average "
          f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    for label, tok_s, cpu_use, ratios in rows:
        print(f"  {label:<34} {tok_s:8.1f} tok/s  cpu use {cpu_use:.2f} "
              f"({tok_s / cpu_use:6.1f} per second of CPU time a thread)  {ratios}",
              flush=True)
    print_defaults(model_dir, args.device, hf_runs, paged_runs)


def print_defaults(model_dir: str, device: str, hf_runs: dict, paged_runs: dict) -> None:
    """Each engine at its default dtype, from the runs above (when both were measured)."""
    paged_dtype = resolve_dtype("auto", AutoConfig.from_pretrained(model_dir),
                                platforms.get(device))
    hf_dtype = AutoModelForCausalLM.from_pretrained(model_dir).dtype
    name = str(hf_dtype).removeprefix("torch.")
    if paged_dtype not in paged_runs or name not in hf_runs:
        print(f"  defaults: pagedllm {paged_dtype}, HF {hf_dtype}: not both measured")
        return
    print(f"  defaults: pagedllm dtype=auto ({str(paged_dtype).removeprefix('torch.')}) / "
          f"HF from_pretrained default ({name}): "
          f"{paged_runs[paged_dtype] / hf_runs[name][0]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["default", "tiny"],
                        help="'default', 'tiny', or model directories")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="default 32 on cpu, 256 on cuda")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="HF static batch size: default 16 on cpu, 64 on cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["auto", "float32", "bfloat16"],
                        help="pagedllm dtypes (cpu); auto is the engine's default")
    parser.add_argument("--hf-dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"],
                        help="HF baseline dtypes (cpu); float32 is HF's default")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both (default: torch's choice)")
    throughput_cuda.add_cuda_arguments(parser)
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    args.num_prompts = args.num_prompts or (256 if on_gpu else 32)
    args.hf_batch_size = args.hf_batch_size or (64 if on_gpu else 16)
    if on_gpu:
        throughput_cuda.main_cuda(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    default_dir = resolve_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = {"default": default_dir}.get(name, name)
            if name == "tiny":
                model_dir = make_tiny_model(default_dir, tmp)
            bench_cpu_model(name, model_dir, args)


if __name__ == "__main__":
    main()
