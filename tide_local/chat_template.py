"""Chat templates from model files, rendered in a bounded jinja2 sandbox.

A template comes off the internet with the model: it renders in jinja2's immutable sandbox,
under a deadline and a size budget, in the calling thread, and the render itself stops when
it runs over (see `_BoundedSandbox`). Whatever goes wrong while rendering is one
ChatTemplateError.
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

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from tide_local.errors import ChatTemplateError, TideError

RENDER_SECONDS = 5.0  # a real chat template renders in about a millisecond
MAX_TEMPLATE_CHARS = 1 << 16  # real templates are a few KiB (the largest known ~20 KiB)
DEFAULT_RENDER_CHARS = 1 << 22  # the output budget of a tokenizer that does not know its context
MAX_INT_BITS = 1 << 16  # integers a template computes (str() refuses more than 4300 digits anyway)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def first_line(err: BaseException) -> str:
    """An exception's message, its first line (or its type's name)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ChatTemplate:
    """A chat template from a model file, compiled once, rendered within limits."""

    def __init__(self, text: str):
        self.text = text
        self._env: _BoundedSandbox | None = None
        self._compiled: tuple[str, jinja2.Template] | None = None

    def render(self, *, seconds: float, max_chars: int, **context) -> str:
        """The template rendered with `context`, stopped past `seconds` or `max_chars` characters;
        every failure is one ChatTemplateError."""
        if len(self.text) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"the chat template is {len(self.text):,} characters, more than the "
                                    f"{MAX_TEMPLATE_CHARS:,} a chat template needs")
        if self._env is None:
            self._env = _BoundedSandbox()
        budget = _Budget(seconds, max_chars)
        try:
            with self._env.bounded(budget):
                if self._compiled is None or self._compiled[0] != self.text:
                    self._compiled = (self.text, self._env.from_string(self.text))
                return budget.collect(self._compiled[1].generate(**context))
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
            raise ChatTemplateError(f"the chat template failed: {first_line(err)}") from None
        except TideError:
            raise
        except Exception as err:  # ZeroDivisionError, RecursionError, MemoryError, a filter's ValueError, ...
            raise ChatTemplateError(f"the chat template failed: {type(err).__name__}: {first_line(err)}") from None


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
