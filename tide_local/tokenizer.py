"""The model's own tokenizer and chat template, from the GGUF.

The tokenizer is the checkpoint's `tokenizer.json` (stored whole in the GGUF) run by the
`tokenizers` library; the chat template renders in jinja2's immutable sandbox. Both come
from a file off the internet, so both are bounded, and every way they fail is one error:

- the tokenizer JSON: at most MAX_TOKENIZER_JSON characters; its padding and truncation
  settings are dropped (a prompt is encoded as it is: a `Fixed` padding of 10^8 would make
  every encoding gigabytes); no more ids than the model has rows (checked at load, naming
  the file); its pre-tokenizer is tried at load on runs of one character, which make a
  backtracking regex blow up (the Rust panic of Oniguruma's retry limit becomes a GGUFError).
- a text is encoded only if it can fit the context (`max_tokens`): a token covers at most
  `max_token_bytes` bytes of text (the longest entry of the vocabulary, times 4 when a
  normalizer may compose characters), so a text of more bytes than max_tokens times that
  needs more tokens than the context holds and is refused before tokenizing (tokenizing
  costs ~200 bytes of memory per byte of text). Encoding releases the GIL.
- a GGUF without `tokenizer.huggingface.json` (llama.cpp's converter writes none) gets its
  tokenizer built from `tokenizer.ggml.*` (`tokenizer_json_from_ggml`): byte-level BPE from
  the tokens and merges, the pre-tokenizer's split regex by its llama.cpp name, added
  tokens from the token types. It goes through the same checks as a stored one.
- the chat template renders under a deadline (RENDER_SECONDS) and a size budget (the text
  the context can hold), in the calling thread, and the render itself stops when it runs
  over: see `tide_local.chat_template`. Whatever goes wrong while rendering is one
  ChatTemplateError.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from typing import Callable, Sequence

from gguf import TokenType
from tokenizers import Tokenizer as HFTokenizer

from tide_local.chat_template import DEFAULT_RENDER_CHARS, RENDER_SECONDS, ChatTemplate, first_line
from tide_local.errors import ChatTemplateError, ContextError, GGUFError

MAX_TOKENIZER_JSON = 64 << 20  # real ones are ~10 MiB (a 157k vocabulary and its merges)
NORMALIZER_SLACK = 4  # NFC/NFKC composition shrinks UTF-8 text at most 3x (Hangul jamo: 9 bytes -> 3)
PROBE_SECONDS = 2.0  # a sane pre-tokenizer splits the probe text in about a millisecond

# runs of one character, which make a regex with nested quantifiers backtrack exponentially
_PROBE = "".join(ch * 256 + end for ch in "a1 .'\u4e2d\u00e9\t!-_<" for end in ("\n", "\x00")) \
    + "The quick brown fox's 42 jumps over the lazy dog.\r\n  Done."


# Split regexes of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`, as the
# checkpoints' tokenizer.json has them. llama-vocab.cpp maps "bailingmoe", "bailingmoe2" and
# "llada-moe" to LLAMA_VOCAB_PRE_TYPE_BAILINGMOE, whose regex is the Ling/LLaDA2 one below
# (llama.cpp makes its possessive quantifiers greedy, which splits text the same way: what
# each one repeats can never be what follows it, so a greedy match never gives any back).
BAILING_SPLIT = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
GGML_PRE_TOKENIZERS = {"bailingmoe2": BAILING_SPLIT, "bailingmoe": BAILING_SPLIT, "llada-moe": BAILING_SPLIT}
# Token types that are added tokens (matched whole in text before BPE); CONTROL ones are special.
_ADDED_TYPES = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED)}


def tokenizer_json_from_ggml(get: Callable[[str], object], source: str) -> str:
    """A tokenizer.json for the `tokenizer.ggml.*` keys of a GGUF (`get(key)` reads one, None
    when absent), as llama.cpp's converter writes them for LLaDA2: `model` "gpt2" (byte-level
    BPE), `pre` one of GGML_PRE_TOKENIZERS, `tokens`, `token_type`, `merges`. The tokens form
    the BPE vocabulary at their ids; CONTROL and USER_DEFINED ones are added tokens too (matched
    whole in text, as llama.cpp does; special: CONTROL, skipped when decoding); the UNUSED rows
    at the end (the padded embedding) are left out. GGUFError, naming `source`, when the keys
    cannot make one; the JSON is bounded by MAX_TOKENIZER_JSON before it is built."""
    model, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")
    if model is None:
        raise GGUFError(f"{source}: no tokenizer: neither tokenizer.huggingface.json nor tokenizer.ggml.model "
                        "(convert the model with `tide convert`)")
    if model != "gpt2":
        shown = model if not isinstance(model, str) or len(model) <= 40 else model[:37] + "..."
        raise GGUFError(f"{source}: tokenizer.ggml.model is {shown!r}; a LLaDA2 tokenizer is byte-level BPE ('gpt2')")
    pattern = GGML_PRE_TOKENIZERS.get(pre) if isinstance(pre, str) else None
    if pattern is None:
        shown = pre if not isinstance(pre, str) or len(pre) <= 40 else pre[:37] + "..."
        raise GGUFError(f"{source}: tokenizer.ggml.pre is {shown!r}, a pre-tokenizer tide does not know "
                        f"(it knows {', '.join(repr(k) for k in GGML_PRE_TOKENIZERS)})")
    tokens, types, merges = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type"), get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.tokens is missing or not an array of strings")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise GGUFError(f"{source}: tokenizer.ggml.merges is missing or not an array of strings (BPE needs them)")
    if types is None:  # llama.cpp takes every token as NORMAL then
        types = [int(TokenType.NORMAL)] * len(tokens)
    try:
        kinds = [int(k) for k in types]
    except (TypeError, ValueError):
        raise GGUFError(f"{source}: tokenizer.ggml.token_type is not an array of integers") from None
    if len(kinds) != len(tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.token_type has {len(kinds)} entries for {len(tokens)} tokens")
    # bound the JSON before building it: each token and merge costs its text and a few characters
    estimate = sum(len(t) + 12 for t in tokens) + sum(len(m) + 12 for m in merges)
    if estimate > MAX_TOKENIZER_JSON:
        raise GGUFError(f"{source}: the tokenizer in tokenizer.ggml.* would be {estimate / 2**20:.0f} MiB of JSON, "
                        f"more than the {MAX_TOKENIZER_JSON >> 20} MiB a tokenizer needs")
    used = [i for i, k in enumerate(kinds) if k != int(TokenType.UNUSED)]
    if not used:
        raise GGUFError(f"{source}: tokenizer.ggml.token_type marks every token unused")
    # Every id up to the last used one is in the BPE vocabulary at its id, added tokens and unused
    # rows between included: `tokenizers` numbers an added token that is not in the vocabulary
    # itself (after the vocabulary), so only this keeps every id where the GGUF has it. Merges
    # never make an added token or a placeholder, so BPE never emits them. The unused rows after
    # the last used one (the embedding's padding) are left out, as the checkpoint's tokenizer.json
    # leaves them out. A repeated text keeps its last id, as llama.cpp's vocabulary does.
    vocab = {tokens[i]: i for i in range(used[-1] + 1)}
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kinds[i] == int(TokenType.CONTROL)}
             for i in used if kinds[i] in _ADDED_TYPES]
    pairs = []
    for n, merge in enumerate(merges):
        cut = merge.find(" ", 1)  # as llama.cpp splits them: a token never starts with a bare space
        if cut < 0:
            raise GGUFError(f"{source}: tokenizer.ggml.merges entry {n} ({merge[:40]!r}) is not two tokens")
        pairs.append([merge[:cut], merge[cut + 1:]])
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": pairs},
    }, ensure_ascii=False)


_STDERR_LOCK = threading.Lock()  # one redirection of fd 2 at a time (each restores what it saved)


@contextlib.contextmanager
def _panic_report_dropped():
    """Run Rust code with fd 2 held in a temporary file. A Rust panic prints its report (lines,
    a backtrace with RUST_BACKTRACE) straight to fd 2 before Python sees the exception: that is
    dropped, the caller says what failed in one line. Whatever else reached fd 2 meanwhile
    (another thread) is passed on afterwards."""
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no fd 2 to hold
            yield
            return
        panicked = False
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            except BaseException as err:
                panicked = _is_panic(err)
                raise
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                if not panicked:
                    held.seek(0)
                    rest = held.read()
                    if rest:
                        os.write(2, rest)


def _is_panic(err: BaseException) -> bool:
    """A Rust panic inside `tokenizers` (pyo3's PanicException derives from BaseException)."""
    return type(err).__name__ == "PanicException"


def _utf8_error(text: str, err: UnicodeEncodeError) -> str:
    char = text[err.start]
    if 0xDC80 <= ord(char) <= 0xDCFF:  # how Python keeps an undecodable byte (surrogateescape)
        return f"it holds the byte 0x{ord(char) - 0xDC00:02x}, which is not UTF-8, at character {err.start}"
    return f"it holds the lone surrogate U+{ord(char):04X} at character {err.start}"


class Tokenizer:
    """The model's tokenizer and chat template.

    vocab_size: the model's vocabulary rows; a tokenizer with more ids is refused (GGUFError).
    max_tokens: the context the texts are for (None: unbounded); `encode` refuses a text that
      cannot fit it, and the chat template's output is bounded by what it can hold.
    render_seconds: the chat template's time limit.
    source: the file named in messages."""

    def __init__(self, tokenizer_json: str, chat_template: str | None = None, bos_token: str = "", eos_token: str = "",
                 *, vocab_size: int | None = None, max_tokens: int | None = None,
                 render_seconds: float = RENDER_SECONDS, source: str = "the model"):
        self.source = source
        if len(tokenizer_json) > MAX_TOKENIZER_JSON:
            raise GGUFError(f"{source}: the stored tokenizer is {len(tokenizer_json) / 2**20:.0f} MiB of JSON, more "
                            f"than the {MAX_TOKENIZER_JSON >> 20} MiB a tokenizer needs")
        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except BaseException as err:  # the library raises a bare Exception on bad JSON, a panic on worse
            if not (isinstance(err, Exception) or _is_panic(err)):
                raise
            raise GGUFError(f"{source}: the stored tokenizer cannot be loaded: {first_line(err)}") from None
        # a prompt is encoded as it is: no padding to a fixed length, no silent truncation
        self._tok.no_padding()
        self._tok.no_truncation()
        self.size = self._tok.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and self.size > vocab_size:
            raise GGUFError(f"{source}: the stored tokenizer has {self.size} token ids but the model's vocabulary has "
                            f"{vocab_size} rows (a tokenizer of another model?)")
        self.max_token_bytes = self._max_token_bytes()
        self.max_tokens = max_tokens
        self.render_seconds = render_seconds
        self._bos, self._eos = bos_token, eos_token
        self._template = ChatTemplate(chat_template or "")
        self._probe()

    @classmethod
    def from_gguf(cls, gguf, *, vocab_size: int | None = None, max_tokens: int | None = None) -> "Tokenizer":
        """The tokenizer a GGUF stores: its tokenizer.huggingface.json (`tide convert`), else one
        built from its tokenizer.ggml.* keys (llama.cpp's converter; `tokenizer_json_from_ggml`)."""
        raw = gguf.get("tokenizer.huggingface.json")
        if not isinstance(raw, str):
            raw = tokenizer_json_from_ggml(gguf.get, str(gguf.path))
        tokens = gguf.get("tokenizer.ggml.tokens") or []

        def token(key):
            i = gguf.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        return cls(raw, gguf.get("tokenizer.chat_template"),
                   token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"),
                   vocab_size=vocab_size, max_tokens=max_tokens, source=str(gguf.path))

    # -- bounds --------------------------------------------------------------------------
    def _max_token_bytes(self) -> int:
        """The most bytes of text one token can stand for: its longest vocabulary entry (in a
        byte-level vocabulary each character is one byte of text; elsewhere count UTF-8), times
        NORMALIZER_SLACK when a normalizer may compose characters before the model sees them."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        byte_level = type(self._tok.decoder).__name__ == "ByteLevel"
        longest = max((len(t) if byte_level else len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)
        return max(1, longest) * (NORMALIZER_SLACK if self._tok.normalizer is not None else 1)

    def text_limit(self, max_tokens: int) -> int:
        """Bytes of text beyond which a text certainly needs more than `max_tokens` tokens."""
        return max_tokens * self.max_token_bytes

    def _probe(self) -> None:
        started = time.perf_counter()
        try:
            self._encode(_PROBE)
        except GGUFError as err:
            raise GGUFError(f"{err} (on the test text tried at load: its pre-tokenizer cannot split ordinary text)") \
                from None
        seconds = time.perf_counter() - started
        if seconds > PROBE_SECONDS:
            raise GGUFError(f"{self.source}: the stored tokenizer took {seconds:.1f} s to split {len(_PROBE)} "
                            "characters of test text (a pre-tokenizer regex that backtracks)")

    # -- text <-> ids ----------------------------------------------------------------
    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text` (no special tokens added). With `max_tokens` (default: the
        tokenizer's), a text too long to fit that many tokens is refused before tokenizing
        (ContextError); text that is not valid Unicode is a ValueError."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        limit_tokens = self.max_tokens if max_tokens is None else max_tokens
        limit = None if limit_tokens is None else self.text_limit(limit_tokens)
        if limit is not None and len(text) > limit:  # a character is at least one byte
            self._too_long(len(text), limit_tokens, "at least ")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            raise ValueError(f"the text is not valid UTF-8: {_utf8_error(text, err)}") from None
        if limit is not None and size > limit:
            self._too_long(size, limit_tokens)
        return self._encode(text)

    def _too_long(self, size: int, max_tokens: int, at_least: str = ""):
        raise ContextError(f"the prompt is {at_least}{size:,} bytes: more than a context of {max_tokens} tokens can "
                           f"hold (a token of this model covers at most {self.max_token_bytes} bytes); "
                           "shorten the prompt")

    def _encode(self, text: str) -> list[int]:
        try:  # encode_batch releases the GIL while Rust works (encode holds it: a UI thread would freeze)
            with _panic_report_dropped():
                return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        except BaseException as err:
            if not _is_panic(err):
                raise
            raise GGUFError(f"{self.source}: the stored tokenizer failed: {first_line(err)}") from None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; ids past the tokenizer (padded vocabulary rows) are skipped."""
        known = [int(i) for i in ids if 0 <= int(i) < self.size]
        return self._tok.decode(known, skip_special_tokens=skip_special)

    def token_id(self, content: str) -> int | None:
        return self._tok.token_to_id(content)

    # -- chat ------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The chat template's source (None: the model has none)."""
        return self._template.text or None

    @chat_template.setter
    def chat_template(self, text: str | None) -> None:
        self._template.text = text or ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            seconds: float | None = None, max_chars: int | None = None) -> str:
        """`messages` rendered with the model's chat template, within `seconds` (default:
        render_seconds) and at most `max_chars` characters of output (default: what the
        context holds, or DEFAULT_RENDER_CHARS without one). Every failure, running over
        included, is a ChatTemplateError; messages longer than the budget are a ContextError."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; pass raw text instead")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("messages must be dicts with string 'role' and 'content'")
        seconds = self.render_seconds if seconds is None else seconds
        if max_chars is None:
            max_chars = DEFAULT_RENDER_CHARS if self.max_tokens is None else self.text_limit(self.max_tokens)
        held = sum(len(m["content"]) for m in messages)
        if held > max_chars:
            room = f"a context of {self.max_tokens} tokens holds at most {max_chars:,}" if self.max_tokens else \
                f"the chat template renders at most {max_chars:,}"
            raise ContextError(f"the messages are {held:,} characters: {room}; shorten them")
        return self._template.render(seconds=seconds, max_chars=max_chars, messages=messages,
                                     add_generation_prompt=add_generation_prompt, bos_token=self._bos,
                                     eos_token=self._eos)
