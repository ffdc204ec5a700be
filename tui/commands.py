"""Slash commands typed in the chat input, and the generation settings `/set` changes."""

from __future__ import annotations

from dataclasses import dataclass

from tide_local.diffusion import DecodeOptions, option_specs

# The decoder options a chat can change, as `/set` spells them, with their types (from the table).
OPTION_TYPES: dict[str, type] = {name: spec.kind for name, spec in option_specs().items() if spec.in_chat}


def _aliases() -> dict[str, str]:
    """Other spellings: the command-line flags without dashes, and "temp"."""
    out = {"temp": "temperature"}
    for name, spec in option_specs().items():
        for flag in (spec.flag, spec.short):
            if flag and spec.in_chat:
                out[flag.lstrip("-")] = name
    return out


ALIASES = _aliases()

# What `/set NAME default` restores to None: the model's own value (or, for max_new_tokens, the chat's).
DEFAULT_WORDS = ("default", "none", "off")

DEFAULT_MAX_NEW_TOKENS = 512

COMMANDS: list[tuple[str, str]] = [
    ("/reset", "start a new conversation (also /new, Ctrl+N); the system prompt stays"),
    ("/system TEXT", "set the system prompt for the next answers; /system alone shows it, /system off removes it"),
    ("/set NAME VALUE", f"change a generation option for the next answers: {', '.join(OPTION_TYPES)} "
                        "(VALUE 'default' restores it); /set alone lists them"),
    ("/stats", "statistics of the last answer: speed, steps, and the expert offload per layer"),
    ("/help", "keys and commands (also F1)"),
    ("/quit", "leave (also Ctrl+Q)"),
]

_NAMES = {"reset", "new", "system", "set", "stats", "help", "quit", "exit"}


class CommandError(ValueError):
    """A slash command that cannot be run as typed; the message says what to type instead."""


@dataclass
class Command:
    name: str  # one of _NAMES, with aliases folded: new -> reset, exit -> quit
    argument: str = ""


def parse_command(text: str) -> Command | None:
    """The command in `text`, or None if it is a message to send.

    A message that should start with a slash is typed with two: "//etc" sends "/etc"."""
    stripped = text.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    word, _, argument = stripped[1:].partition(" ")
    name = word.lower()
    if name not in _NAMES:
        known = ", ".join("/" + n for n in ("reset", "system", "set", "stats", "help", "quit"))
        raise CommandError(f"unknown command /{word} (commands: {known}; start a message with // to send a slash)")
    name = {"new": "reset", "exit": "quit"}.get(name, name)
    return Command(name, argument.strip())


def message_text(text: str) -> str:
    """The text to send for an input that is not a command ("//x" stands for "/x")."""
    stripped = text.strip()
    return stripped[1:] if stripped.startswith("//") else stripped


class GenerationSettings:
    """The decoder options of the next answers. None means: the model's default."""

    def __init__(self, values: dict | None = None, model_defaults: dict | None = None):
        self.values: dict = {name: None for name in OPTION_TYPES}
        self.values["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        self.values.update({k: v for k, v in (values or {}).items() if k in OPTION_TYPES and v is not None})
        self.model_defaults = dict(model_defaults or {})
        self._check(self.values)

    def set(self, text: str) -> str:
        """Apply "NAME VALUE" (as typed after /set); return a line saying what changed."""
        parts = text.split()
        if len(parts) != 2:
            raise CommandError(f"usage: /set NAME VALUE, NAME one of {', '.join(OPTION_TYPES)}")
        key, raw = parts[0].lower(), parts[1]
        name = ALIASES.get(key, key)
        if name not in OPTION_TYPES:
            raise CommandError(f"no option '{parts[0]}' (options: {', '.join(OPTION_TYPES)})")
        if raw.lower() in DEFAULT_WORDS:
            value = DEFAULT_MAX_NEW_TOKENS if name == "max_new_tokens" else None
        else:
            kind = OPTION_TYPES[name]
            try:
                value = kind(raw)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise CommandError(f"{name} takes {what}, got '{raw}'") from None
        candidate = dict(self.values, **{name: value})
        self._check(candidate)
        self.values = candidate
        return f"{name} = {self.shown(name)} for the next answers"

    def _check(self, values: dict) -> None:
        try:
            DecodeOptions.build(values, self.model_defaults)
        except ValueError as err:
            raise CommandError(str(err)) from None

    def options(self) -> dict:
        """Keyword arguments for Engine.stream (model defaults left to the engine)."""
        return {k: v for k, v in self.values.items() if v is not None}

    def shown(self, name: str) -> str:
        value = self.values[name]
        if value is not None:
            return str(value)
        if name in self.model_defaults:
            return f"{self.model_defaults[name]} (model default)"
        return {"temperature": "0 (greedy)", "seed": "fresh each answer"}.get(name, "off")

    def describe(self) -> str:
        width = max(len(n) for n in OPTION_TYPES)
        return "\n".join(f"{name:<{width}}  {self.shown(name)}" for name in OPTION_TYPES)
