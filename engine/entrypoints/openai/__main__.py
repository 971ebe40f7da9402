"""`python -m engine.entrypoints.openai [MODEL] ...`: the same as `pagedllm serve [MODEL] ...`."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
