"""`python -m engine.entrypoints.openai [MODEL] ...`: the same server as `pagedllm serve`."""

import argparse
import logging
import sys

from engine.cli_serve import add_serve_args
from engine.entrypoints.openai.api_server import run_server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.entrypoints.openai",
                                     description="pagedllm's OpenAI-compatible server")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_server(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
