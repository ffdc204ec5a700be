"""The model's own tokenizer and chat template, from the GGUF.

The tokenizer is the checkpoint's `tokenizer.json` (stored whole in the GGUF) run by the
`tokenizers` library. The chat template comes from the internet, so it renders in
jinja2's immutable sandbox and a broken template is one clear error.
"""

from __future__ import annotations

from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from tide_local.errors import ChatTemplateError, GGUFError, TideError


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    def __init__(self, tokenizer_json: str, chat_template: str | None = None, bos_token: str = "", eos_token: str = ""):
        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as err:  # the library raises a bare Exception on bad JSON
            raise GGUFError(f"the tokenizer stored in the model cannot be loaded: {err}") from None
        self.size = self._tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._bos, self._eos = bos_token, eos_token
        self._template = None

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        raw = gguf.get("tokenizer.huggingface.json")
        if not isinstance(raw, str):
            raise GGUFError(f"{gguf.path}: no tokenizer.huggingface.json (convert the model with `tide convert`)")
        tokens = gguf.get("tokenizer.ggml.tokens") or []

        def token(key):
            i = gguf.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        return cls(raw, gguf.get("tokenizer.chat_template"),
                   token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))

    # -- text <-> ids ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; ids past the tokenizer (padded vocabulary rows) are skipped."""
        known = [int(i) for i in ids if 0 <= int(i) < self.size]
        return self._tok.decode(known, skip_special_tokens=skip_special)

    def token_id(self, content: str) -> int | None:
        return self._tok.token_to_id(content)

    # -- chat ------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; pass raw text instead")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("messages must be dicts with string 'role' and 'content'")
        try:
            if self._template is None:
                # the options transformers renders chat templates with
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
                env.globals["raise_exception"] = _raise
                self._template = env.from_string(self.chat_template)
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except jinja2.exceptions.SecurityError as err:
            raise ChatTemplateError(f"the chat template tried something unsafe: {err}") from None
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"the chat template failed: {err}") from None
