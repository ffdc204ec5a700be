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
- the chat template renders under a deadline (RENDER_SECONDS) and a size budget (the text
  the context can hold), in the calling thread, and the render itself stops when it runs
  over: see `_BoundedSandbox`. Whatever goes wrong while rendering is one ChatTemplateError.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import os
import re
import string
import sys
import threading
import time
from contextlib import contextmanager
from typing import Sequence

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer as HFTokenizer

from tide_local.errors import ChatTemplateError, ContextError, GGUFError, TideError

RENDER_SECONDS = 5.0  # a real chat template renders in about a millisecond
MAX_TEMPLATE_CHARS = 1 << 16  # real templates are a few KiB (the largest known ~20 KiB)
DEFAULT_RENDER_CHARS = 1 << 22  # the output budget of a tokenizer that does not know its context
MAX_TOKENIZER_JSON = 64 << 20  # real ones are ~10 MiB (a 157k vocabulary and its merges)
MAX_INT_BITS = 1 << 16  # integers a template computes (str() refuses more than 4300 digits anyway)
NORMALIZER_SLACK = 4  # NFC/NFKC composition shrinks UTF-8 text at most 3x (Hangul jamo: 9 bytes -> 3)
PROBE_SECONDS = 2.0  # a sane pre-tokenizer splits the probe text in about a millisecond

# runs of one character, which make a regex with nested quantifiers backtrack exponentially
_PROBE = "".join(ch * 256 + end for ch in "a1 .'\u4e2d\u00e9\t!-_<" for end in ("\n", "\x00")) \
    + "The quick brown fox's 42 jumps over the lazy dog.\r\n  Done."


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _is_panic(err: BaseException) -> bool:
    """A Rust panic inside `tokenizers` (pyo3's PanicException derives from BaseException)."""
    return type(err).__name__ == "PanicException"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
            raise GGUFError(f"{source}: the stored tokenizer cannot be loaded: {_first_line(err)}") from None
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
        self.chat_template = chat_template
        self._bos, self._eos = bos_token, eos_token
        self._env: _BoundedSandbox | None = None
        self._compiled: tuple[str, jinja2.Template] | None = None
        self._probe()

    @classmethod
    def from_gguf(cls, gguf, *, vocab_size: int | None = None, max_tokens: int | None = None) -> "Tokenizer":
        raw = gguf.get("tokenizer.huggingface.json")
        if not isinstance(raw, str):
            raise GGUFError(f"{gguf.path}: no tokenizer.huggingface.json (convert the model with `tide convert`)")
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
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        except BaseException as err:
            if not _is_panic(err):
                raise
            raise GGUFError(f"{self.source}: the stored tokenizer failed: {_first_line(err)}") from None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; ids past the tokenizer (padded vocabulary rows) are skipped."""
        known = [int(i) for i in ids if 0 <= int(i) < self.size]
        return self._tok.decode(known, skip_special_tokens=skip_special)

    def token_id(self, content: str) -> int | None:
        return self._tok.token_to_id(content)

    # -- chat ------------------------------------------------------------------------
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
        if len(self.chat_template) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"the chat template is {len(self.chat_template):,} characters, more than the "
                                    f"{MAX_TEMPLATE_CHARS:,} a chat template needs")
        seconds = self.render_seconds if seconds is None else seconds
        if max_chars is None:
            max_chars = DEFAULT_RENDER_CHARS if self.max_tokens is None else self.text_limit(self.max_tokens)
        held = sum(len(m["content"]) for m in messages)
        if held > max_chars:
            room = f"a context of {self.max_tokens} tokens holds at most {max_chars:,}" if self.max_tokens else \
                f"the chat template renders at most {max_chars:,}"
            raise ContextError(f"the messages are {held:,} characters: {room}; shorten them")
        if self._env is None:
            self._env = _BoundedSandbox()
        budget = _Budget(seconds, max_chars)
        try:
            with self._env.bounded(budget):
                if self._compiled is None or self._compiled[0] != self.chat_template:
                    self._compiled = (self.chat_template, self._env.from_string(self.chat_template))
                return budget.collect(self._compiled[1].generate(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self._bos,
                    eos_token=self._eos,
                ))
        except _RenderLimit as err:
            raise ChatTemplateError(f"the chat template was stopped: {err}") from None
        except jinja2.exceptions.TemplateNotFound as err:
            raise ChatTemplateError(f"the chat template failed: it includes or imports '{err.name}', and a chat "
                                    "template cannot load other templates") from None
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ChatTemplateError(f"the chat template failed: {err.message} (line {err.lineno})") from None
        except jinja2.exceptions.SecurityError as err:
            raise ChatTemplateError(f"the chat template tried something unsafe: {err}") from None
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"the chat template failed: {_first_line(err)}") from None
        except TideError:
            raise
        except Exception as err:  # ZeroDivisionError, RecursionError, MemoryError, a filter's ValueError, ...
            raise ChatTemplateError(f"the chat template failed: {type(err).__name__}: {_first_line(err)}") from None


# -- the bounded sandbox -----------------------------------------------------------------------
#
# Time: while a template compiles and renders, a trace function (sys.settrace, this thread
# only, the previous one restored after) checks the deadline at every line of the compiled
# template and every call into jinja2 or this module, and raises _RenderLimit there: the
# render itself stops, no thread is left running. _RenderLimit is a BaseException, so no
# `except Exception` on the way swallows it.
#
# Size: every value a template makes stays under max_value (4x the output budget), measured
# as text (_weight: what containers hold counts, shared or not, as str() would write it). It
# is checked before the step where C code would make it big at once: `**` and `*` on integers
# (bits), `*` and `+` on sequences, `%` and str.format (widths times fields), `~`, the str
# methods and filters that multiply their input (replace, join, center/ljust/rjust/zfill,
# expandtabs, translate, indent, wordwrap, batch, slice, tojson with indent), list/tuple/dict
# literals (`[x, x]` nested by {% set %} a hundred times), and every value printed; results of
# calls and filters are checked after. So no single C operation (str(), ==, join) works on
# more than max_value; loops and macros are bounded by the deadline; the output stops at
# max_chars. The loader is empty ({% include %} finds nothing) and lipsum is gone.

_JINJA_DIR = os.path.dirname(jinja2.__file__)
_THIS_FILE = __file__
_TEMPLATE_FILE = "<template>"


class _RenderLimit(BaseException):
    """The render ran over its time or size budget."""


class _Budget:
    def __init__(self, seconds: float, max_chars: int):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.max_chars = max_chars
        self.max_value = 4 * max_chars + 4096  # an intermediate value: room for split(), escaping, ...

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _RenderLimit(f"it ran past its time limit of {self.seconds:g} s (a template that loops too long)")

    def check_size(self, size: int | None, what: str) -> None:
        if size is not None and size > self.max_value:
            raise _RenderLimit(f"{what} would make a value of more than {self.max_value:,} characters")

    def check_value(self, value, what: str):
        if isinstance(value, str):
            self.check_size(len(value), what)
        elif isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_INT_BITS:
                raise _RenderLimit(f"{what} made an integer of more than {MAX_INT_BITS:,} bits")
        elif not isinstance(value, float):
            self.check_size(_weight(value, self.max_value, self), what)
        return value

    def collect(self, chunks) -> str:
        out, total = [], 0
        for chunk in chunks:
            total += len(chunk)
            if total > self.max_chars:
                raise _RenderLimit(f"its output passed {self.max_chars:,} characters, more than the prompt may be")
            out.append(chunk)
        return "".join(out)


def _weight(value, limit: int, budget: "_Budget | None" = None) -> int:
    """The size of `value` as text, up to a small factor: characters of strings, one per
    element and per integer digit group, counting what containers hold (shared or not, as
    str() would); stops once past `limit` (and at the budget's deadline)."""
    total, stack, steps = 0, [value], 0
    while stack:
        v = stack.pop()
        steps += 1
        if budget is not None and not steps & 0xFFFF:
            budget.check_time()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset, collections.deque)):
            total += 1 + len(v)
            if total <= limit:
                stack.extend(v)
        elif isinstance(v, dict):
            total += 1 + 2 * len(v)
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, (collections.abc.KeysView, collections.abc.ValuesView, collections.abc.ItemsView)):
            total += 1 + len(v)
            if total <= limit:
                stack.extend(v)
        elif isinstance(v, Namespace):
            stack.append(v._Namespace__attrs)
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        else:
            total += 1
        if total > limit:
            return total
    return total


def _depth(value, limit: int = 1000) -> int:
    """How deeply lists and dicts nest in `value` (at most `limit`)."""
    deepest, stack, seen = 0, [(value, 0)], 0
    while stack and deepest < limit and seen < 100_000:
        v, d = stack.pop()
        seen += 1
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _ints(values) -> list[int]:
    items = values.values() if isinstance(values, dict) else values if isinstance(values, (tuple, list)) else [values]
    return [v for v in items if isinstance(v, int)]


def _digits_bound(text: str) -> int:
    """The largest number written in `text` (a width or precision); huge for a long digit run."""
    return max((int(d) if len(d) <= 9 else 10**9 for d in re.findall(r"\d+", text)), default=0)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?.", re.S)


def _percent_bound(fmt, values, limit: int) -> int:
    """An upper bound of len(fmt % values): each conversion is at most its width, its
    precision, or all the values as text."""
    fmt = str(fmt)
    specs = _PERCENT_SPEC.findall(fmt)
    width = max((_digits_bound(part) for spec in specs for part in spec if part != "*"), default=0)
    if any("*" in spec for spec in specs):
        width = max([width] + [abs(i) for i in _ints(values)])
    return len(fmt) + len(specs) * (width + _weight(values, limit))


def _format_bound(fmt: str, args, kwargs, limit: int) -> int:
    """An upper bound of len(fmt.format(*args, **kwargs)), in the same way."""
    fields, width, nested = 0, 0, False
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is not None:
            fields += 1
            if spec:
                width = max(width, _digits_bound(spec))
                nested = nested or "{" in spec
    if nested:
        width = max([width] + [abs(i) for i in _ints(args) + _ints(kwargs)])
    return len(fmt) + fields * (width + _weight(args, limit) + _weight(kwargs, limit))


def _replace_bound(s, old, new, count=-1) -> int:
    hits = len(s) + 1 if not old else s.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _pad_bound(s, width, *_):
    return max(len(s), int(width))


def _translate_bound(s, table) -> int:
    values = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
    return len(s) * max([1] + [len(v) for v in values if isinstance(v, (str, bytes))])


# str (and bytes) methods whose result can be much larger than the string: an upper bound of its length
_METHOD_BOUNDS = {
    "center": _pad_bound, "ljust": _pad_bound, "rjust": _pad_bound, "zfill": _pad_bound,
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(0, tabsize),
    "replace": _replace_bound,
    "translate": _translate_bound,
    "join": lambda sep, items: sum(len(i) for i in items if isinstance(i, (str, bytes)))
    + len(sep) * max(0, len(items) - 1),
}


def _text_bound(value, limit: int) -> int:
    return len(value) if isinstance(value, str) else _weight(value, limit)


def _indent_bound(limit, s, width=4, first=False, blank=False) -> int:
    pad = len(width) if isinstance(width, str) else int(width)
    lines = s.count("\n") + 1 if isinstance(s, str) else _weight(s, limit) + 1
    return _text_bound(s, limit) + lines * max(0, pad)


def _wordwrap_bound(limit, s, width=79, break_long_words=True, wrapstring=None, *_) -> int:
    # at most one wrap string per character of text
    return _text_bound(s, limit) * (1 + len(str(wrapstring or "\n")))


def _join_bound(limit, items, d="", attribute=None) -> int:
    return sum(_text_bound(i, limit) for i in items) + _text_bound(d, limit) * max(0, len(items) - 1)


def _tojson_bound(limit, value, indent=None) -> int:
    pad = 0 if indent is None else len(indent) if isinstance(indent, str) else int(indent)
    return _weight(value, limit) * (1 + max(0, pad) * _depth(value))


def _fill_bound(limit, value, count, fill_with=None) -> int:
    return _weight(value, limit) + int(count) * (1 + _weight(fill_with, limit))


# filters whose output can be much larger than their input: (limit, value, *other args) -> a bound
_FILTER_BOUNDS = {
    "center": lambda limit, value, width=80: max(_text_bound(value, limit), int(width)),
    "indent": _indent_bound,
    "replace": lambda limit, s, old, new, count=None: _replace_bound(str(s), str(old), str(new), count),
    "wordwrap": _wordwrap_bound,
    "join": _join_bound,
    "format": lambda limit, value, *args, **kwargs: _percent_bound(value, kwargs or args, limit),
    "batch": _fill_bound,
    "slice": _fill_bound,
    "tojson": _tojson_bound,
}


def _bound(func, *args, **kwargs) -> int | None:
    """func's bound, or None where the arguments are of the wrong kind (the call itself then
    raises the error)."""
    try:
        return func(*args, **kwargs)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


class _CodeGenerator(CodeGenerator):
    """Routes `~` and the list, tuple and dict literals of a template through the environment,
    which measures what they make (`[x, x]` a hundred times over is 2^100 elements as text)."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _measured(self, visit, node, frame) -> None:
        self.write("environment.measured(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame) -> None:
        self._measured(super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._measured(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx == "store":  # `{% for a, b in ... %}`: names, not a value
            super().visit_Tuple(node, frame)
        else:
            self._measured(super().visit_Tuple, node, frame)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the options transformers renders chat templates with, whose
    operations check the render's deadline and size budget (see above)."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})  # also: none is folded at compile time

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                         loader=jinja2.DictLoader({}), finalize=self._finalize)
        self._local = threading.local()
        self.globals.pop("lipsum", None)
        self.globals["raise_exception"] = _raise
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["sum"] = self._bounded_filter("sum", jinja2.pass_environment(_sum))

    # -- the budget of the render running in this thread -------------------------------------
    @contextmanager
    def bounded(self, budget: _Budget):
        previous_budget = getattr(self._local, "budget", None)
        self._local.budget = budget

        def line(frame, event, arg):
            if event == "line" and time.monotonic() > budget.deadline:
                budget.check_time()
            return line

        def call(frame, event, arg):
            filename = frame.f_code.co_filename
            if filename == _TEMPLATE_FILE:
                budget.check_time()
                return line
            if filename.startswith(_JINJA_DIR) or filename == _THIS_FILE:
                budget.check_time()
            return None

        previous_trace = sys.gettrace()
        sys.settrace(call)
        try:
            yield budget
        finally:
            sys.settrace(previous_trace)
            self._local.budget = previous_budget

    def _budget(self) -> _Budget:
        budget = getattr(self._local, "budget", None)
        if budget is None:
            raise RuntimeError("a chat template ran outside of Tokenizer.apply_chat_template")
        return budget

    # -- operations ----------------------------------------------------------------------------
    def call_binop(self, context, operator: str, left, right):
        budget = self._budget()
        budget.check_time()
        ints = all(isinstance(x, int) for x in (left, right))
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            if right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
                raise _RenderLimit(f"'{operator}' would make an integer of more than {MAX_INT_BITS:,} bits")
        elif operator == "*" and ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise _RenderLimit(f"'{operator}' would make an integer of more than {MAX_INT_BITS:,} bits")
        elif operator == "*" and isinstance(left, int) != isinstance(right, int):
            times, seq = (left, right) if isinstance(left, int) else (right, left)
            if times > 1 and isinstance(seq, (str, bytes, list, tuple)):
                budget.check_size(times * _weight(seq, budget.max_value), f"'{operator}'")
        elif operator == "+" and not isinstance(left, (int, float)):
            budget.check_size(_weight(left, budget.max_value) + _weight(right, budget.max_value), f"'{operator}'")
        elif operator == "%" and isinstance(left, str):
            budget.check_size(_percent_bound(left, right, budget.max_value), f"'{operator}'")
        return budget.check_value(self.binop_table[operator](left, right), f"'{operator}'")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own spelling)
        budget = __self._budget()
        budget.check_time()
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, (str, bytes)) and name in _METHOD_BOUNDS:
            if name == "join" and len(args) == 1 and not kwargs:
                args = (list(args[0]),)
            budget.check_size(_bound(_METHOD_BOUNDS[name], owner, *args, **kwargs), f"{type(owner).__name__}.{name}")
        result = super().call(__context, __obj, *args, **kwargs)
        return budget.check_value(result, f"the result of {name or 'a call'}")

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(wrapped)
        def bounded(*args, **kwargs):
            budget = self._budget()
            mapping = args[0] if is_map and args else kwargs
            budget.check_size(_bound(_format_bound, fmt, () if is_map else args, mapping, budget.max_value),
                              f"str.{value.__name__}")
            return wrapped(*args, **kwargs)

        return bounded

    def _bounded_filter(self, name: str, func):
        bound = _FILTER_BOUNDS.get(name)
        first = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # after the context it is passed

        @functools.wraps(func)  # keeps jinja2's pass_context / pass_eval_context mark
        def filtered(*args, **kwargs):
            budget = self._budget()
            budget.check_time()
            if name == "join" and len(args) > first:  # materialize the items once, to measure them
                args = (*args[:first], list(args[first]), *args[first + 1:])
            if bound is not None:
                budget.check_size(_bound(bound, budget.max_value, *args[first:], **kwargs), f"the filter '{name}'")
            return budget.check_value(func(*args, **kwargs), f"the filter '{name}'")

        return filtered

    def measured(self, value):
        """A list, tuple or dict literal's value, measured."""
        return self._budget().check_value(value, "a literal")

    def concat_values(self, values) -> str:
        """`a ~ b ~ ...`: the values as text, joined, within the budget."""
        budget = self._budget()
        parts, total = [], 0
        for value in values:
            text = self._finalize(value)
            total += len(text)
            budget.check_size(total, "'~'")
            parts.append(text)
        return "".join(parts)

    def concat(self, parts) -> str:
        """The text of a buffered block (a macro, {% set %}...{% endset %}, {% filter %})."""
        parts = list(parts)
        self._budget().check_size(sum(map(len, parts)), "a block")
        return "".join(parts)

    def _finalize(self, value) -> str:
        """A value as output text, measured before str() makes it."""
        if isinstance(value, str):
            return value
        budget = self._budget()
        budget.check_size(_weight(value, budget.max_value, budget), "printing a value")
        return str(value)


def _sum(environment, iterable, attribute=None, start=0):
    """The `sum` filter one addition at a time, each one bounded (builtin sum() of lists is
    quadratic work in C, out of the deadline's reach)."""
    from jinja2.filters import make_attrgetter

    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        total = environment.call_binop(None, "+", total, item)
    return total
