"""`pagedllm chat`: chat with a model in the terminal, the reply streamed as it is generated.

The whole conversation goes through the tokenizer's chat template every turn,
so the model sees the history. `/exit` or end of input quits; Ctrl-C stops
the reply being generated.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Callable, Optional

from engine.entrypoints.stream_delta import DeltaTracker

EXIT_COMMANDS = ("/exit", "/quit")
PROMPT = ">>> "


def add_chat_parser(subparsers) -> None:
    from engine.cli import add_engine_args

    parser = subparsers.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Interactive chat (the default model unless --model). "
                    "/exit or Ctrl-D quits; Ctrl-C stops a reply.")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    add_engine_args(parser)
    parser.set_defaults(func=run_chat)


class ChatSession:
    """One conversation with an LLMEngine that serves nobody else."""

    def __init__(self, engine, params, system: Optional[str] = None):
        tokenizer = engine.get_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template: the model's tokenizer has no chat template")
        self.engine = engine
        self.tokenizer = tokenizer
        self.params = params
        self.messages: list[dict] = [] if system is None else [
            {"role": "system", "content": system}]
        self._request_ids = itertools.count()

    def reply(self, user_text: str, write: Callable[[str], None]) -> str:
        """Generate the answer to `user_text`, writing it piece by piece; -> the answer."""
        self.messages.append({"role": "user", "content": user_text})
        text = self.tokenizer.apply_chat_template(self.messages, tokenize=False,
                                                  add_generation_prompt=True)
        prompt_token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        request_id = f"chat-{next(self._request_ids)}"
        try:
            self.engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids},
                                    self.params)
        except ValueError as err:  # e.g. the conversation outgrew max_model_len
            self.messages.pop()
            write(f"[error: {err}]")
            return ""
        answer = self._stream(request_id, write)
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _stream(self, request_id: str, write: Callable[[str], None]) -> str:
        tracker, answer = DeltaTracker(), ""
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    write(tracker.update(output.outputs[0], output.finished).text)
                    answer = output.outputs[0].text
        except KeyboardInterrupt:
            self.engine.abort_request(request_id)
            write(" [stopped]")
        return answer


def run_chat(args: argparse.Namespace) -> None:
    from engine import LLM, SamplingParams
    from engine.cli import engine_kwargs

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p)
    print("Loading the model...", file=sys.stderr, flush=True)
    llm = LLM(**engine_kwargs(args))
    session = ChatSession(llm.llm_engine, params, args.system)
    print("Chat started: /exit or Ctrl-D quits, Ctrl-C stops a reply.", flush=True)
    while True:
        try:
            line = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in EXIT_COMMANDS:
            return
        if line:
            session.reply(line, _write)
            print(flush=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
