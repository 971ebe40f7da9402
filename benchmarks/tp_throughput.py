"""Tensor-parallel throughput: pagedllm output tok/s at TP=1 and TP=N, same run.

For each model shape (random bf16 weights written from a config: the
Llama-3.2-1B and Llama-3.1-8B shapes) a fresh process per engine runs `LLM`
on `--num-prompts` random prompts of `--input-len` token ids at once, each
emitting exactly `--output-len` greedy tokens (EOS ignored). Engines: TP=1
and each `--tp` size > 1, each with its default runner (on cuda the fast
path: staging, fused kernels, CUDA graphs, on every rank) and with
`enforce_eager=True` (the plain model runner). Prints output tok/s and the
speed-up of each engine over both TP=1 engines. `--check` first asserts that
greedy tokens at TP=2 (both runners) equal eager TP=1's on a tiny float32
Llama.

    python benchmarks/tp_throughput.py --device cuda --tp 2 --check

`--plan-broadcast` instead measures, on CPUs (gloo, 2 processes), what
sending one decode step's plan from rank 0 to a worker costs: `--num-prompts`
sequences in the middle of their generation (`--input-len` + `--output-len`
/ 2 tokens of context), sent as the engine sends it (two int64 tensors,
`engine.distributed.step_channel`) and as it used to (the pickled plan,
`broadcast_object_list` over gloo). Each timed step ends with a one-int
all-reduce, so rank 0 measures the round trip through the worker's decode;
the all-reduce alone is timed too and subtracted.

    python benchmarks/tp_throughput.py --plan-broadcast
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, PreTrainedTokenizerFast

from engine.distributed.environment import MULTICAST_OFF
from engine.step_inputs import StepArrays, StepPlan

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # The greedy check: O(1) activations, so TP's other summation order never flips a token.
    "tiny-check": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                       vocab_size=1000, tie_word_embeddings=False, rope_theta=10000.0),
}
_SHARD_BYTES = 4 << 30
_RESULT = "RESULT "


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one token per id ("t0", "t1", ...): decodes any id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)},
                                           unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t1",
                                   pad_token="t1", unk_token="t0")


def write_random_model(shape: str, out_dir: Path, dtype: torch.dtype, device: str) -> Path:
    """Save config, tokenizer and random weights (safetensors shards) of `shape`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=0,
                         eos_token_id=1, architectures=["LlamaForCausalLM"])
    config.dtype = dtype
    with torch.device("meta"):
        names_shapes = [(n, p.shape) for n, p in
                        AutoModelForCausalLM.from_config(config).named_parameters()]
    generator = torch.Generator(device).manual_seed(0)
    shard, shard_bytes, weight_map, index = {}, 0, {}, 0
    for i, (name, param_shape) in enumerate(names_shapes):
        if name.endswith("norm.weight"):
            tensor = torch.ones(param_shape, dtype=dtype)
        else:
            tensor = torch.randn(param_shape, generator=generator, device=device)
            tensor = (tensor * param_shape[-1] ** -0.5).to(dtype).cpu()
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= _SHARD_BYTES or i == len(names_shapes) - 1:
            file_name = f"model-{index:05d}.safetensors"
            save_file(shard, str(out_dir / file_name))
            weight_map.update({n: file_name for n in shard})
            shard, shard_bytes, index = {}, 0, index + 1
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config.save_pretrained(out_dir)
    word_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir


def random_prompts(vocab_size: int, num_prompts: int, input_len: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size, (num_prompts, input_len), generator=generator)
    return [{"prompt_token_ids": row} for row in ids.tolist()]


def bench_one(args: argparse.Namespace) -> dict:
    """One engine, one TP size: load, warm up, time one generate over all prompts."""
    from engine import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=args.model_dir, device=args.device, dtype=args.dtype,
              tensor_parallel_size=args.tp, enforce_eager=args.eager,
              max_model_len=args.input_len + args.output_len)
    load_seconds = time.perf_counter() - started
    vocab_size = llm.llm_engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    # Warm up on other prompts: the timed ones must not hit the prefix cache.
    llm.generate(random_prompts(vocab_size, 4, args.input_len, seed=1), params, use_tqdm=False)
    prompts = random_prompts(vocab_size, args.num_prompts, args.input_len, seed=0)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    assert all(len(t) == args.output_len for t in token_ids)
    llm.shutdown()
    return {"engine": engine_name(args.tp, args.eager), "load_s": load_seconds,
            "elapsed_s": elapsed, "output_tok_s": args.num_prompts * args.output_len / elapsed,
            "token_ids": token_ids if args.keep_tokens else None}


def engine_name(tp: int, eager: bool) -> str:
    return f"TP={tp}" + (" eager" if eager else "")


def run_in_fresh_process(args: argparse.Namespace, model_dir: Path, tp: int, eager: bool,
                         keep_tokens: bool = False, **overrides) -> Optional[dict]:
    """The engine's result, or None (its output printed) when it failed."""
    settings = {**vars(args), **overrides}
    command = [sys.executable, __file__, "--one", str(model_dir), "--tp-one", str(tp),
               "--device", settings["device"], "--dtype", settings["dtype"],
               "--num-prompts", str(settings["num_prompts"]),
               "--input-len", str(settings["input_len"]),
               "--output-len", str(settings["output_len"])]
    if keep_tokens:
        command.append("--keep-tokens")
    if eager:
        command.append("--eager")
    env = {**os.environ, **MULTICAST_OFF}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{engine_name(tp, eager)} on {model_dir} FAILED (exit {proc.returncode}):\n"
              f"{(proc.stdout + proc.stderr)[-4000:]}", flush=True)
        return None
    line = next(l for l in proc.stdout.splitlines() if l.startswith(_RESULT))
    return json.loads(line[len(_RESULT):])


def check_greedy(args: argparse.Namespace, tmp: Path) -> None:
    model_dir = write_random_model("tiny-check", tmp / "tiny-check", torch.float32, "cpu")
    settings = dict(dtype="float32", num_prompts=16, input_len=24, output_len=32)
    runs = {(tp, eager): run_in_fresh_process(args, model_dir, tp, eager, keep_tokens=True,
                                              **settings)
            for tp, eager in ((1, True), (2, False), (2, True))}
    if None in runs.values():
        raise SystemExit("greedy check: an engine failed")
    want = runs[1, True]["token_ids"]
    for (tp, eager), run in runs.items():
        if (tp, eager) == (1, True):
            continue
        mismatched = sum(a != b for a, b in zip(want, run["token_ids"]))
        print(f"greedy check (tiny fp32 Llama, {settings['num_prompts']} prompts x "
              f"{settings['output_len']} tokens): {engine_name(tp, eager)} vs TP=1 eager "
              f"mismatched prompts: {mismatched}", flush=True)
        if mismatched:
            raise SystemExit(f"{engine_name(tp, eager)} greedy tokens differ from TP=1")


def decode_step_plan(num_requests: int, context_len: int, block_size: int = 16) -> StepPlan:
    """The plan of a decode step: `num_requests` sequences with `context_len` tokens
    computed and one new token each, random distinct blocks."""
    rng = np.random.default_rng(0)
    width = -(-(context_len + 1) // block_size)
    block_tables = rng.permutation(num_requests * width).astype(np.int32).reshape(
        num_requests, width)
    arrays = StepArrays(token_ids=rng.integers(2, 128000, num_requests),
                        num_computed=np.full(num_requests, context_len, np.int64),
                        num_new=np.ones(num_requests, np.int64), block_tables=block_tables,
                        samples=np.ones(num_requests, bool))
    return StepPlan([], arrays, [arrays.sampling_rows()])


def _pickled_send(plan: StepPlan) -> None:
    from engine.distributed.parallel_state import get_tp_group

    dist.broadcast_object_list([plan], src=0, group=get_tp_group().cpu_group)


def _pickled_receive() -> StepPlan:
    from engine.distributed.parallel_state import get_tp_group

    box = [None]
    dist.broadcast_object_list(box, src=0, group=get_tp_group().cpu_group)
    return box[0]


def _seconds_per_step(steps: dict, rounds: int, steps_per_round: int = 100) -> dict:
    """Seconds of each `steps[name]()` followed by a one-int all-reduce (the ranks'
    lock-step): the median over `rounds` of a round's mean, the methods taking turns
    round by round (this machine's load drifts)."""
    from engine.distributed.parallel_state import get_tp_group

    ack = torch.zeros(1, dtype=torch.int64)
    rounds_seconds = {name: [] for name in steps}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(steps_per_round):
                step()
                dist.all_reduce(ack, group=get_tp_group().cpu_group)
            if round_index:
                rounds_seconds[name].append((time.perf_counter() - started) / steps_per_round)
    return {name: float(np.median(seconds)) for name, seconds in rounds_seconds.items()}


def _plan_broadcast_rank(rank: int, store_port: int, plan: StepPlan, iterations: int) -> None:
    import platforms
    from engine.distributed.launcher import join_group
    from engine.distributed.parallel_state import destroy_tp_group
    from engine.distributed.step_channel import receive_step, send_step

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", store_port, 3, is_master=False)
    join_group(platforms.get("cpu"), 2, rank, rank, store)
    methods = {"ack alone": (lambda: None, lambda: None),
               "pickled (before)": (lambda: _pickled_send(plan), _pickled_receive),
               "tensors (now)": (lambda: send_step(plan), receive_step)}
    seconds = _seconds_per_step({name: pair[rank > 0] for name, pair in methods.items()},
                                rounds=max(1, iterations // 100))
    destroy_tp_group()
    if rank > 0:
        return
    net = {name: seconds[name] - seconds["ack alone"] for name in methods}
    for name in methods:
        print(f"{name:>17}: {seconds[name] * 1e6:8.1f} us per step"
              + ("" if name == "ack alone" else f" ({net[name] * 1e6:.1f} us over the ack)"),
              flush=True)
    print(f"plan send + receive, pickled / tensors: "
          f"{net['pickled (before)'] / net['tensors (now)']:.2f}x", flush=True)


def bench_plan_broadcast(args: argparse.Namespace) -> None:
    context_len = args.input_len + args.output_len // 2
    plan = decode_step_plan(args.num_prompts, context_len)
    print(f"plan of a decode step: {args.num_prompts} sequences x {context_len} tokens of "
          f"context ({plan.arrays.block_tables.shape[1]} blocks each), CPU gloo, 2 "
          f"processes, {args.iterations} steps per method (medians of rounds of 100)",
          flush=True)
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    mp.start_processes(_plan_broadcast_rank, args=(store.port, plan, args.iterations),
                       nprocs=2, start_method="spawn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"],
                        choices=list(SHAPES))
    parser.add_argument("--tp", nargs="+", type=int, default=[2], help="sizes > 1")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--check", action="store_true", help="greedy TP=2 == TP=1 first")
    parser.add_argument("--plan-broadcast", action="store_true",
                        help="only time one decode step's plan broadcast (CPU, gloo)")
    parser.add_argument("--iterations", type=int, default=2000,
                        help="timed steps per method of --plan-broadcast")
    parser.add_argument("--one", dest="model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--tp-one", dest="tp_one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keep-tokens", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_dir:
        args.tp = args.tp_one
        print(_RESULT + json.dumps(bench_one(args)), flush=True)
        return
    if args.plan_broadcast:
        bench_plan_broadcast(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.check:
            check_greedy(args, Path(tmp))
        for shape in args.shapes:
            started = time.perf_counter()
            model_dir = write_random_model(shape, Path(tmp) / shape,
                                           getattr(torch, args.dtype), args.device)
            print(f"{shape}: random checkpoint written in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            engines = [(1, False), (1, True)] + [(tp, eager) for tp in args.tp
                                                 for eager in (False, True)]
            results = [run_in_fresh_process(args, model_dir, tp, eager) for tp, eager in engines]
            fast, eager = (r["output_tok_s"] if r else float("nan") for r in results[:2])
            for result in filter(None, results):
                print(f"{shape} {args.dtype}, {args.num_prompts} prompts x {args.input_len} "
                      f"in / {args.output_len} out: {result['engine']}: "
                      f"{result['output_tok_s']:.0f} output tok/s "
                      f"({result['elapsed_s']:.2f} s, load {result['load_s']:.0f} s); "
                      f"vs TP=1 {result['output_tok_s'] / fast:.2f}x, "
                      f"vs TP=1 eager {result['output_tok_s'] / eager:.2f}x", flush=True)


if __name__ == "__main__":
    main()
