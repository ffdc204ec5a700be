"""The tokenizer files of a checkpoint turned into GGUF metadata.

The vocabulary goes into llama.cpp's ``tokenizer.ggml.*`` keys (padded to the model's
vocabulary size, as llama.cpp's own converter does), the whole ``tokenizer.json`` into
``tokenizer.huggingface.json`` (what our engine loads; a file without it, such as one from
llama.cpp's converter, gets its tokenizer rebuilt from ``tokenizer.ggml.*``: see
``tide_local.tokenizer.tokenizer_json_from_ggml``), the chat template into
``tokenizer.chat_template``. Special ids are found by token content.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import TokenType

from tide_local.errors import CheckpointError
from tide_local.architecture import SPECIAL_TOKEN_KEYS, SPECIAL_TOKENS


def find_special_ids(tokenizer_json: dict) -> dict[str, int]:
    """Ids of the special tokens we need, by content (`bos` may be absent)."""
    by_content = {t.get("content"): t.get("id") for t in tokenizer_json.get("added_tokens", [])}
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    ids = {}
    for role, content in SPECIAL_TOKENS.items():
        token_id = by_content.get(content, vocab.get(content))
        if isinstance(token_id, int):
            ids[role] = token_id
    return ids


def chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = directory / "chat_template.jinja"
    if not template and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return template if isinstance(template, str) and template.strip() else None


def tokenizer_metadata(tokenizer_path: Path, tokenizer_config: dict, vocab_size: int) -> dict[str, object]:
    """GGUF keys for the tokenizer; raises CheckpointError on anything unusable."""
    raw = tokenizer_path.read_text(encoding="utf-8")
    try:
        tok = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{tokenizer_path}: not valid JSON ({err.msg})") from None
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{tokenizer_path}: expected a byte-level BPE tokenizer (model.type BPE)")

    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size

    def place(token: str, token_id, token_type: TokenType):
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise CheckpointError(
                f"{tokenizer_path}: token {token!r} has id {token_id}, outside the model's vocabulary of {vocab_size}"
            )
        tokens[token_id] = token
        types[token_id] = int(token_type)

    for token, token_id in model["vocab"].items():
        place(token, token_id, TokenType.NORMAL)
    for added in tok.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        place(added.get("content", ""), added.get("id"), kind)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = find_special_ids(tok)
    for role in ("mask", "eos"):
        if role not in special:
            raise CheckpointError(f"{tokenizer_path}: no {SPECIAL_TOKENS[role]} token (a LLaDA2 tokenizer has one)")

    meta: dict[str, object] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "bailingmoe2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.padding_token_id": special["eos"],
        "tokenizer.ggml.add_bos_token": bool(tokenizer_config.get("add_bos_token", False)),
        "tokenizer.ggml.add_eos_token": bool(tokenizer_config.get("add_eos_token", False)),
        "tokenizer.huggingface.json": raw,
    }
    for role, token_id in special.items():
        meta[SPECIAL_TOKEN_KEYS[role]] = token_id
    template = chat_template(tokenizer_path.parent, tokenizer_config)
    if template:
        meta["tokenizer.chat_template"] = template
    return meta
