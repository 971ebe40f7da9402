"""The `pagedllm` console script.

Each subcommand is one `add_<name>_parser(subparsers)` function that
registers its arguments and sets `func` to the function running it; adding a
subcommand = writing such a pair and listing the adder in SUBCOMMANDS.
Engine flags are shared through `add_engine_args` / `engine_kwargs`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from engine.cli_bench import add_bench_parser
from engine.cli_chat import add_chat_parser
from engine.cli_serve import add_serve_parser

ENGINE_ARGS = {
    # flag: (type, default, help)
    "model": (str, None, "model directory (HF format); default: SmolLM2-135M-Instruct"),
    "tokenizer": (str, None, "tokenizer directory; default: the model's"),
    "device": (str, "auto", "platform: auto, cpu, cuda, rocm or xpu"),
    "dtype": (str, "auto", "auto, float32, float16 or bfloat16"),
    "seed": (int, 0, "random seed of the engine"),
    "block-size": (int, 16, "tokens per KV cache block"),
    "max-model-len": (int, None, "context length; default: the model's"),
    "max-num-seqs": (int, 256, "most sequences in one step"),
    "max-num-batched-tokens": (int, None, "most tokens in one step"),
    "gpu-memory-utilization": (float, 0.9, "fraction of GPU memory the engine may use"),
    "num-gpu-blocks-override": (int, None, "number of KV blocks, overriding the sizing"),
    "kv-cache-memory": (int, None, "KV cache bytes (CPU default 2 GiB; on GPUs it replaces "
                        "the gpu-memory-utilization sizing)"),
    "attention-backend": (str, None, "attention backend of the platform; default its fastest"),
    "tensor-parallel-size": (int, 1, "devices (processes) to split the model over; "
                             "docs/distributed.md"),
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for flag, (type_, default, help_) in ENGINE_ARGS.items():
        group.add_argument(f"--{flag}", type=type_, default=default, help=help_)
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True, help="reuse the KV of shared prompt prefixes")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(...)` keyword arguments given by `add_engine_args` flags."""
    names = [flag.replace("-", "_") for flag in ENGINE_ARGS] + ["enable_prefix_caching"]
    return {name: getattr(args, name) for name in names}


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="complete prompts and print the completions",
        description="Complete prompts with greedy (temperature 0) or sampled decoding.")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts-file", type=Path,
                         help="a file with one prompt per line (blank lines skipped)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k")
    add_engine_args(parser)
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    from engine import LLM, SamplingParams

    if args.prompt:
        prompts = args.prompt
    else:
        try:
            lines = args.prompts_file.read_text().splitlines()
        except OSError as err:
            raise ValueError(f"--prompts-file: {err}") from None
        prompts = [line for line in lines if line.strip()]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k)
    llm = LLM(**engine_kwargs(args))
    for output in llm.generate(prompts, params):
        completion = output.outputs[0]
        print(f"Prompt: {output.prompt!r}\nCompletion: {completion.text!r} "
              f"[{completion.finish_reason}]\n")


SUBCOMMANDS: list[Callable] = [add_generate_parser, add_serve_parser, add_chat_parser,
                               add_bench_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedllm",
        description="pagedllm: LLM inference with a paged KV cache and continuous batching.")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except ValueError as err:
        print(f"pagedllm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
