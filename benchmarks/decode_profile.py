"""Where one decode step's time goes: torch.profiler over engine steps at a full batch.

`profile_decode(llm, batch_size, ...)` fills the engine with `batch_size`
requests, steps until every one of them is decoding, then profiles
`num_steps` decode steps. GPU kernel time is split into attention (the
paged attention and KV write kernels of either backend), GEMMs (cuBLAS /
CUTLASS) and other kernels; the host gap is the step's wall time the GPU
spends idle (wall time - kernel time). Before that, the phases of
`LLMEngine.step` are timed with host clocks (no profiler attached) and the
Python hot spots listed by cProfile.

The requests are streamed (cumulative outputs every step), so each engine
step is one decode step with all its host work; `LLM.generate` runs up to
`GpuModelRunner.max_decode_steps` decode steps per engine step instead
(multi-step decode, engine.scheduler), which spreads that host work.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

_ATTENTION = ("paged_attention", "decode_mma", "decode_simple", "prefill_mma",
              "combine_splits", "write_kv")
_GEMM = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "matmul")


def kernel_category(name: str) -> str:
    lowered = name.lower()
    if any(key in lowered for key in _ATTENTION):
        return "attention"
    if any(key in lowered for key in _GEMM):
        return "gemm"
    return "other"


def _timed(obj, name: str, totals: dict) -> None:
    """Wrap `obj.name` so its host time accumulates in totals[name]."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - started

    setattr(obj, name, wrapper)


def _fill(engine, batch_size: int, prompt_len: int, vocab_size: int, params) -> None:
    generator = torch.Generator().manual_seed(7)
    prompts = torch.randint(2, vocab_size, (batch_size, prompt_len), generator=generator)
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"profile-{i}", {"prompt_token_ids": prompt}, params)
    while engine.scheduler.num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    engine.step()


_PHASES = (("scheduler", "schedule"), ("model_runner", "execute_model"),
           ("model_runner", "execute_plan"), ("model_runner", "_sample"),
           ("scheduler", "update_from_output"))


def _host_phases(engine, num_steps: int) -> dict:
    """Wall ms per step and host ms per step of each phase (no profiler attached);
    `gc` is the time Python's garbage collector ran."""
    totals: dict[str, float] = defaultdict(float)
    for owner, name in _PHASES:
        _timed(getattr(engine, owner), name, totals)
    gc_started = []

    def on_gc(phase, info):
        if phase == "start":
            gc_started.append(time.perf_counter())
        elif gc_started:
            totals["gc"] += time.perf_counter() - gc_started.pop()

    gc.callbacks.append(on_gc)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    gc.callbacks.remove(on_gc)
    for owner, name in _PHASES:
        delattr(getattr(engine, owner), name)
    return {"wall": wall * 1e3 / num_steps,
            **{name: seconds * 1e3 / num_steps for name, seconds in totals.items()}}


def _python_hotspots(engine, num_steps: int, top: int = 20) -> str:
    """cProfile of `num_steps` engine steps: the functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(num_steps):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def profile_decode(llm, batch_size: int, prompt_len: int, num_steps: int,
                   trace_path: str | None = None) -> dict:
    """Time, then profile, decode steps at `batch_size`; returns the per-step summary (ms).

    20 steps with host timers only, 10 under cProfile (Python hot spots), then
    `num_steps` under torch.profiler (kernel times).
    """
    from engine import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 64, ignore_eos=True,
                            detokenize=False)
    _fill(engine, batch_size, prompt_len, engine.vocab_size, params)
    assert engine.scheduler.num_running == batch_size, engine.scheduler.num_running
    phases = _host_phases(engine, 20)
    hotspots = _python_hotspots(engine, 10)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    engine.abort_request([f"profile-{i}" for i in range(batch_size)])
    if trace_path:
        prof.export_chrome_trace(trace_path)
    summary = _summarize(prof, wall, num_steps)
    summary.update(host_phases=phases, hotspots=hotspots)
    return summary


def _summarize(prof, wall: float, num_steps: int) -> dict:
    by_category: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        micros = getattr(event, "self_device_time_total", 0.0)
        by_category[kernel_category(event.key)] += micros
        kernels.append((micros, event.count, event.key))
    per_step = {key: value / 1e3 / num_steps for key, value in by_category.items()}
    busy = sum(per_step.values())
    step_ms = wall * 1e3 / num_steps
    summary = {"step_ms": step_ms, "gpu_busy_ms": busy, "host_gap_ms": step_ms - busy,
               **{f"{key}_ms": per_step.get(key, 0.0) for key in ("attention", "gemm", "other")},
               "top_kernels": [(name[:80], count // num_steps, micros / 1e3 / num_steps)
                               for micros, count, name in sorted(kernels, reverse=True)[:12]]}
    return summary


def print_summary(summary: dict, batch_size: int) -> None:
    step = summary["step_ms"]
    print(f"decode step at batch {batch_size}: {step:.2f} ms wall, GPU busy "
          f"{summary['gpu_busy_ms']:.2f} ms", flush=True)
    for key in ("attention", "gemm", "other"):
        value = summary[f"{key}_ms"]
        print(f"  {key:10s} {value:7.3f} ms  {100 * value / step:5.1f}% of the step")
    gap = summary["host_gap_ms"]
    print(f"  {'host gap':10s} {gap:7.3f} ms  {100 * gap / step:5.1f}% (GPU idle)")
    phases = summary["host_phases"]
    print(f"  without the profiler: {phases.pop('wall'):.2f} ms/step wall; host ms/step: "
          + ", ".join(f"{name} {ms:.3f}" for name, ms in phases.items()))
    print("  top kernels (name, launches/step, ms/step):")
    for name, count, millis in summary["top_kernels"]:
        print(f"    {millis:7.3f} ms  x{count:<4d} {name}")
    print("  Python hot spots (cProfile, 10 steps):")
    print(summary["hotspots"])
