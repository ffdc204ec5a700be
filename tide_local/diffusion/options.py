"""The decoding options, as one table: each field of :class:`DecodeOptions` carries its rule,
its command-line flag and its help in its metadata. The CLI flags (``tide generate``,
``tide chat``), the validation, the chat's ``/set`` and the engine's keyword arguments are all
derived from it, so a new option is one new field."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

import numpy as np


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


@dataclass(frozen=True)
class OptionSpec:
    """How one decoding option is typed, checked, and spelled for users."""

    kind: type  # int or float: what a typed value is parsed as
    rule: str  # completes "NAME ... , got VALUE" when `ok` fails
    ok: Callable[[Any], bool]  # the check of a value of the right kind
    help: str
    flag: str | None = None  # the command-line flag; None: not on the command line
    short: str | None = None
    metavar: str = "X"
    optional: bool = False  # None is a valid value (the feature is off)
    model_default: bool = False  # the model file's decoding defaults override the field default
    in_chat: bool = True  # settable with the chat's /set

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        typed = _is_int(value) if self.kind is int else _is_real(value)
        return typed and self.ok(value)


def _option(default, **spec) -> Any:
    return field(default=default, metadata={"option": OptionSpec(**spec)})


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings. Defaults follow the model: greedy, block 32, 32 steps, threshold 0.95.

    ``top_k`` / ``top_p`` only act when ``temperature > 0``: at temperature 0 the token is the
    argmax of the full row, which neither filter can change, and its confidence is the unfiltered
    softmax probability. ``seed`` seeds the sampler (``None``: fresh entropy each run).
    """

    max_new_tokens: int = _option(
        256, kind=int, rule="must be a positive integer", ok=lambda v: v > 0, flag="--max-new-tokens", short="-n",
        metavar="N", help="generate at most N tokens")
    threshold: float = _option(
        0.95, kind=float, rule="must be in (0, 1]", ok=lambda v: 0.0 < v <= 1.0, flag="--threshold", metavar="T",
        model_default=True,
        help="commit every masked token whose confidence is above T in (0, 1] in one step; lower is faster, "
             "1 is one token per step (default: the model's; 0.95 for LLaDA2.0)")
    steps: int = _option(
        32, kind=int, rule="must be an integer >= 1", ok=lambda v: v >= 1, flag="--steps", metavar="S",
        model_default=True, help="denoising steps per block at most (default: the model's; 32 for LLaDA2.0)")
    block_length: int = _option(
        32, kind=int, rule="must be an integer >= 1", ok=lambda v: v >= 1, model_default=True, in_chat=False,
        help="tokens per block (fixed by the model's training)")
    temperature: float = _option(
        0.0, kind=float, rule="must be >= 0 (0 = greedy)", ok=lambda v: v >= 0, flag="--temperature", metavar="T",
        help="sampling temperature; 0 is greedy (default: 0)")
    top_k: int | None = _option(
        None, kind=int, rule="must be an integer >= 1 or None", ok=lambda v: v >= 1, optional=True,
        flag="--top-k", metavar="K", help="sample among the K most likely tokens (with --temperature > 0)")
    top_p: float | None = _option(
        None, kind=float, rule="must be in (0, 1] or None", ok=lambda v: 0.0 < v <= 1.0, optional=True,
        flag="--top-p", metavar="P",
        help="sample within the smallest set of tokens of probability >= P (with --temperature > 0)")
    seed: int | None = _option(
        None, kind=int, rule="must be a non-negative integer or None", ok=lambda v: v >= 0, optional=True,
        flag="--seed", metavar="S", help="seed of the sampler, for repeatable sampling (default: fresh each run)")

    def validate(self) -> "DecodeOptions":
        """Raise OptionValueError naming the first bad setting; return self."""
        for name, spec in option_specs().items():
            value = getattr(self, name)
            if not spec.accepts(value):
                raise OptionValueError(name, f"{name} {spec.rule}, got {value!r}")
        return self

    @classmethod
    def build(cls, given: dict | None = None, model_defaults: dict | None = None) -> "DecodeOptions":
        """Options from `given` (None values: not given) over the model's defaults, validated.
        Raises TypeError for an unknown name, OptionValueError for a bad value."""
        specs = option_specs()
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise TypeError(f"unknown generation option{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
                            f"(options: {', '.join(specs)})")
        base = {k: v for k, v in (model_defaults or {}).items() if k in specs and specs[k].model_default}
        return cls(**{**base, **given}).validate()


class OptionValueError(ValueError):
    """A decoding option's value breaks its rule; `name` says which option."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def option_specs() -> dict[str, OptionSpec]:
    """Every decoding option's spec, in field order."""
    return {f.name: f.metadata["option"] for f in fields(DecodeOptions)}


def option_default(name: str):
    f = next(f for f in fields(DecodeOptions) if f.name == name)
    return None if f.default is MISSING else f.default


def add_decoding_arguments(group, *, max_new_tokens: int) -> None:
    """The options that have a flag, as argparse arguments of `group` (None: the model's or the
    option's default, left to the engine); `max_new_tokens` is the command's own default."""
    for name, spec in option_specs().items():
        if spec.flag is None:
            continue
        flags = [spec.short, spec.flag] if spec.short else [spec.flag]
        default = max_new_tokens if name == "max_new_tokens" else None
        text = spec.help + (f" (default: {default})" if default is not None else "")
        group.add_argument(*flags, dest=name, type=spec.kind, default=default, metavar=spec.metavar, help=text)


def flag_of(name: str) -> str:
    """How a user types an option on the command line ("-n/--max-new-tokens")."""
    spec = option_specs()[name]
    if spec.flag is None:
        return name
    return f"{spec.short}/{spec.flag}" if spec.short else spec.flag
