"""Incremental detokenization of one sequence, with stop strings.

Text is decoded from a short window of tokens rather than token by token, because a token's
text depends on its neighbours: byte-level BPE tokens may hold part of a multi-byte UTF-8
character, and SentencePiece decoders drop a leading space at the start of a decode call.
The window runs from prefix_offset (context already emitted) to the end; read_offset marks
where the emitted text ends. New text is released only once the window's decode no longer
ends in U+FFFD (an incomplete character), so deltas never split a character. The window
starts with the prompt's last few tokens (those after its last added token), so the first
output token is decoded in context.
"""

from engine.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text as they arrive.

    add_tokens returns the text delta to stream. A delta never shows a stop string: text that
    could still be the start of one is held back (when include_stop_str_in_output is False)
    until it is ruled out. When a stop string matches, output_text is cut before it (or after it
    with include_stop_str_in_output), stop_reason is the string and finished is True; stop
    strings are only looked for once more than min_tokens tokens have been generated.
    When the sequence ends for another reason, flush() returns the text still held back.

    For byte-level BPE tokenizers output_text equals tokenizer.decode(output ids) (with the
    params' skip_special_tokens) up to the stop string; trailing bytes of an incomplete
    character are never emitted. With special tokens kept and spaces_between_special_tokens,
    a space separates each added token from its neighbours, as in HF's slow tokenizers.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.output_text = ""
        self.stop_reason: str | None = None
        self.finished = False
        self._num_output_tokens = 0
        self._num_emitted_chars = 0
        self._added_ids = set(tokenizer.added_tokens_decoder)
        self._skipped_ids = set()
        if params.skip_special_tokens:
            special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
            self._skipped_ids = special | set(tokenizer.all_special_ids)
        self._token_ids: list[int] = []
        self._tokens: list[str] = []
        self._append(self._prompt_context(prompt_token_ids))
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Take newly generated token ids; return the text that may be streamed now."""
        if self.finished or not self.params.detokenize:
            return ""
        for token_id in new_token_ids:
            self._num_output_tokens += 1
            num_chars_before = len(self.output_text)
            if self._append([token_id]):
                self.output_text += self._decode_new_text()
            self._check_stop(num_chars_before)
            if self.finished:
                break
        return self._take_delta()

    def flush(self) -> str:
        """The text held back as a possible stop-string start; call when the sequence ends."""
        delta = self.output_text[self._num_emitted_chars:]
        self._num_emitted_chars = len(self.output_text)
        return delta

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The prompt's last few tokens after its last added token, or none when the prompt
        ends inside a character (output bytes completing it are not text on their own)."""
        context = []
        for token_id in reversed(prompt_token_ids):
            if token_id in self._skipped_ids:
                continue
            if token_id in self._added_ids or len(context) == _PROMPT_CONTEXT_TOKENS:
                break
            context.append(token_id)
        context.reverse()
        text = self.tokenizer.convert_tokens_to_string(self.tokenizer.convert_ids_to_tokens(context))
        return [] if text.endswith(_REPLACEMENT_CHAR) else context

    def _append(self, token_ids: list[int]) -> bool:
        kept = [t for t in token_ids if t not in self._skipped_ids]
        self._token_ids += kept
        self._tokens += self.tokenizer.convert_ids_to_tokens(kept)
        return bool(kept)

    def _decode_new_text(self) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._tokens))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return new_text[len(prefix_text):]

    def _decode(self, start: int, end: int) -> str:
        tokens, token_ids = self._tokens[start:end], self._token_ids[start:end]
        if not self.params.spaces_between_special_tokens or self._added_ids.isdisjoint(token_ids):
            return self.tokenizer.convert_tokens_to_string(tokens)
        pieces, run = [], []
        for token, token_id in zip(tokens, token_ids):
            if token_id not in self._added_ids:
                run.append(token)
                continue
            if run:
                pieces.append(self.tokenizer.convert_tokens_to_string(run))
                run = []
            pieces.append(token)
        if run:
            pieces.append(self.tokenizer.convert_tokens_to_string(run))
        return " ".join(pieces)

    def _check_stop(self, num_chars_before: int) -> None:
        """Look for stop strings ending in the text added since num_chars_before."""
        if not self.params.stop or self._num_output_tokens <= self.params.min_tokens:
            return
        match = None
        for stop in self.params.stop:
            index = self.output_text.find(stop, max(0, num_chars_before - len(stop) + 1))
            if index != -1 and (match is None or index < match[0]):
                match = (index, stop)
        if match is None:
            return
        index, stop = match
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.output_text = self.output_text[:end]
        self.stop_reason = stop
        self.finished = True

    def _take_delta(self) -> str:
        end = len(self.output_text)
        if not self.finished and not self.params.include_stop_str_in_output:
            end -= self._partial_stop_length()
        delta = self.output_text[self._num_emitted_chars:end]
        self._num_emitted_chars = max(self._num_emitted_chars, end)
        return delta

    def _partial_stop_length(self) -> int:
        """Length of the longest suffix of output_text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.params.stop:
            for length in range(min(len(stop) - 1, len(self.output_text)), longest, -1):
                if self.output_text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
