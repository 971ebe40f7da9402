"""GPU offline throughput (`benchmarks/throughput.py --device cuda`): pagedllm vs Hugging Face.

Model: the Llama-3.2-1B shape with random bf16 weights written from a config
(`tp_throughput.write_random_model`: hidden 2048, 16 layers, 32 q / 8 kv
heads, vocab 128256, tied embeddings, rope_theta 500000) and a word-level
tokenizer. Prompts are token ids; every sequence emits exactly its output
length (EOS ignored, no detokenization).

Workloads: `fixed` (256 prompts x 256 tokens in, 256 out) and `varied`
(256 prompts, input and output lengths uniform in 64..512, seed 0). For each
attention backend pagedllm reports output tok/s on both, then the KV waste
at the step of peak KV use and the peak running batch (a separate,
instrumented run), single-request tok/s, and the start-up time of its LLM
(caches warm). In the same run: HF `generate` static batches and HF
continuous batching on the same workloads, and each pagedllm figure's ratio
to them; a cold start-up to first token in a fresh process (empty Triton
cache); a torch.profiler summary of one decode step at batch 256.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

import decode_profile
import hf_baselines
import parallel_sampling
from tp_throughput import write_random_model

Workload = tuple[list[list[int]], list[int]]


def workloads(vocab_size: int, num_prompts: int, seed: int = 0) -> dict[str, Workload]:
    """name -> (prompt token ids, output lengths); ids avoid 0 and 1 (pad, eos)."""
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.randint(2, vocab_size, (num_prompts, 256), generator=generator).tolist()
    generator = torch.Generator().manual_seed(seed)
    input_lens = torch.randint(64, 513, (num_prompts,), generator=generator).tolist()
    output_lens = torch.randint(64, 513, (num_prompts,), generator=generator).tolist()
    varied = [torch.randint(2, vocab_size, (n,), generator=generator).tolist()
              for n in input_lens]
    return {"fixed": (fixed, [256] * num_prompts), "varied": (varied, output_lens)}


def _params(output_lens: list[int]):
    from engine import SamplingParams
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
            for n in output_lens]


def run_pagedllm(llm, workload: Workload) -> tuple[float, float]:
    prompts, output_lens = workload
    requests = [{"prompt_token_ids": p} for p in prompts]
    torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = llm.generate(requests, _params(output_lens), use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    assert produced == output_lens, "a sequence stopped before its output length"
    return sum(output_lens) / elapsed, elapsed


@contextlib.contextmanager
def observing_schedule(scheduler, observe: Callable) -> Iterator[None]:
    """Inside: `observe(output)` after every `scheduler.schedule()`."""
    schedule = scheduler.schedule

    def observed():
        output = schedule()
        observe(output)
        return output

    scheduler.schedule = observed
    try:
        yield
    finally:
        del scheduler.schedule


def serving_stats(llm, workload: Workload) -> tuple[float, int]:
    """(KV waste at peak KV use, peak running batch) over one run.

    Waste is allocated-but-unfilled slots over allocated slots, after each
    schedule; of the steps at peak use the worst one is reported.
    """
    engine = llm.llm_engine
    kv = engine.kv_cache_manager
    samples: list[tuple[float, float, int]] = []  # (usage, waste, batch)
    with observing_schedule(engine.scheduler, lambda output: samples.append(
            (kv.usage, kv.kv_waste(), len(output.scheduled_requests)))):
        run_pagedllm(llm, workload)
    peak_usage = max(usage for usage, _, _ in samples)
    return (max(waste for usage, waste, _ in samples if usage == peak_usage),
            max(batch for _, _, batch in samples))


def step_times(llm, workload: Workload) -> str:
    """Where one run's wall time goes: steps that prefill (some request computes more than
    one known token) vs decode steps, from host clocks around `LLMEngine.step`; a
    multi-step decode (engine.scheduler) counts as its number of decode steps."""
    engine = llm.llm_engine
    steps: list[list] = []  # [prefill?, sequences, decode steps, seconds]
    step = engine.step

    def record(output) -> None:
        num_seqs = len(output.scheduled_requests)
        prefill = output.decode_steps == 1 and output.total_num_scheduled_tokens != num_seqs
        steps.append([prefill, num_seqs, output.decode_steps, 0.0])

    def timed_step():
        started = time.perf_counter()
        try:
            return step()
        finally:
            steps[-1][3] = time.perf_counter() - started

    engine.step = timed_step
    try:
        with observing_schedule(engine.scheduler, record):
            _, elapsed = run_pagedllm(llm, workload)
    finally:
        del engine.step
    prefill_s = sum(sec for prefill, _, _, sec in steps if prefill)
    decode = [(seqs, num, sec) for prefill, seqs, num, sec in steps if not prefill]
    num_decode = sum(num for _, num, _ in decode)
    decode_s = sum(sec for _, _, sec in decode)
    return (f"{elapsed:.2f} s: {len(steps) - len(decode)} prefill steps {prefill_s:.2f} s; "
            f"{num_decode} decode steps in {len(decode)} schedules {decode_s:.2f} s "
            f"({1e3 * decode_s / max(num_decode, 1):.2f} ms each, mean batch "
            f"{sum(seqs * num for seqs, num, _ in decode) / max(num_decode, 1):.0f}); "
            f"outside steps {elapsed - decode_s - prefill_s:.2f} s")


def cold_start(model_dir: str, backend: str) -> float:
    """Seconds from launching a fresh process to its first generated token (empty Triton cache)."""
    script = ("import sys; from engine import LLM, SamplingParams; "
              "llm = LLM(sys.argv[1], device='cuda', attention_backend=sys.argv[2]); "
              "llm.generate([{'prompt_token_ids': list(range(2, 130))}], "
              "SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", script, model_dir, backend], env=env, check=True)
        return time.perf_counter() - started


def bench_backend(model_dir: str, backend: str, loads: dict[str, Workload], args) -> dict:
    from engine import LLM
    started = time.perf_counter()
    llm = LLM(model_dir, device="cuda", attention_backend=backend)
    result = {"startup_s": time.perf_counter() - started,
              "num_blocks": llm.llm_engine.kv_cache_manager.num_blocks}
    # Warm-up on prompts the timed runs do not share (no prefix-cache hits), shaped
    # like them so Triton compiles its kernel variants here rather than while timed.
    vocab_size = llm.llm_engine.vocab_size
    others = workloads(vocab_size, args.num_prompts, seed=1)
    for name in loads:
        run_pagedllm(llm, others[name])
    run_pagedllm(llm, ([workloads(vocab_size, 1, seed=2)["fixed"][0][0]], [16]))
    for name, workload in loads.items():
        result[name] = run_pagedllm(llm, workload)
        print(f"pagedllm [{backend}] {name}: {result[name][0]:.0f} output tok/s "
              f"({result[name][1]:.2f} s)", flush=True)
        result[f"{name}_stats"] = serving_stats(llm, workload)
        # New prompts of the same shapes: a rerun of the timed ones would hit the prefix cache.
        print(f"pagedllm [{backend}] {name} steps: "
              f"{step_times(llm, workloads(vocab_size, args.num_prompts, seed=4)[name])}",
              flush=True)
    result["single"] = run_pagedllm(llm, ([workloads(vocab_size, 1, seed=3)["fixed"][0][0]],
                                          [256]))
    forked, independent = parallel_sampling.forked_vs_independent(llm, vocab_size, 256, 256, 4)
    result["n4_blocks"] = (forked[0], independent[0])
    if args.profile and backend == args.backends[0]:
        summary = decode_profile.profile_decode(llm, args.profile_batch, 256, 5,
                                                args.trace)
        decode_profile.print_summary(summary, args.profile_batch)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    print(f"after freeing the LLM: {torch.cuda.memory_allocated() / 2**30:.2f} GiB still "
          "allocated", flush=True)
    return result


def run_baselines(model_dir: str, loads: dict[str, Workload], args) -> dict:
    baselines = {}
    for name, (prompts, output_lens) in loads.items():
        for label, run in (("hf_static", lambda: hf_baselines.hf_static(
                model_dir, prompts, output_lens, args.hf_batch_size, args.hf_max_batches)),
                           ("hf_cb", lambda: hf_baselines.hf_continuous(
                               model_dir, prompts, output_lens))):
            if label == "hf_cb" and name not in args.hf_cb_workloads:
                continue
            try:
                baselines[(label, name)] = run()
                print(f"{label} {name}: {baselines[(label, name)][0]:.0f} output tok/s "
                      f"({baselines[(label, name)][1]:.1f} s)", flush=True)
            except Exception as err:  # a baseline's failure must not hide the others
                print(f"{label} {name}: FAILED: {type(err).__name__}: {err}", flush=True)
    return baselines


def report(results: dict, baselines: dict, loads: dict, cold: float | None) -> None:
    print("\n=== GPU throughput summary (output tok/s) ===")
    for backend, result in results.items():
        print(f"[{backend}] LLM start-up (warm caches) {result['startup_s']:.1f} s, "
              f"{result['num_blocks']} KV blocks; single request "
              f"{result['single'][0]:.0f} tok/s; n=4 parallel sampling (256 in, 256 out): "
              f"peak KV blocks {result['n4_blocks'][0]} forked vs "
              f"{result['n4_blocks'][1]} for 4 independent requests")
        for name in loads:
            tok_s = result[name][0]
            ratios = ", ".join(f"{tok_s / base[0]:.2f}x {label}"
                               for (label, wl), base in baselines.items() if wl == name)
            waste, batch = result[f"{name}_stats"]
            print(f"[{backend}] {name}: {tok_s:.0f} tok/s ({ratios or 'no baseline'}); "
                  f"KV waste at peak {100 * waste:.2f}%, peak running batch {batch}")
    for (label, name), (tok_s, seconds) in baselines.items():
        print(f"{label} {name}: {tok_s:.0f} tok/s ({seconds:.1f} s)")
    if cold is not None:
        print(f"cold start-up to first token (fresh process, empty Triton cache): {cold:.1f} s")


def main_cuda(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model_dir = str(write_random_model("llama-3.2-1b", Path(tmp) / "model",
                                           torch.bfloat16, "cuda"))
        print(f"random Llama-3.2-1B-shaped checkpoint written in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        cold = None
        if args.cold_start:
            try:
                cold = cold_start(model_dir, args.backends[0])
            except subprocess.CalledProcessError as err:
                print(f"cold start-up run failed: {err}", flush=True)
        loads = {name: load for name, load in workloads(128256, args.num_prompts).items()
                 if name in args.workloads}
        results = {backend: bench_backend(model_dir, backend, loads, args)
                   for backend in args.backends}
        hf_baselines.complete_index(model_dir)
        baselines = run_baselines(model_dir, loads, args) if args.hf else {}
        report(results, baselines, loads, cold)


def add_cuda_arguments(parser) -> None:
    group = parser.add_argument_group("--device cuda")
    group.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    group.add_argument("--workloads", nargs="+", default=["fixed", "varied"])
    group.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--hf-max-batches", type=int, default=None,
                       help="run (and count) only the first N static batches")
    group.add_argument("--hf-cb-workloads", nargs="*", default=["fixed", "varied"])
    group.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--profile-batch", type=int, default=256)
    group.add_argument("--trace", default=None, help="write the profile's Chrome trace here")
    group.add_argument("--cold-start", action=argparse.BooleanOptionalAction, default=True)

