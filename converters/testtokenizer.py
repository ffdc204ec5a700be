"""A tokenizer of LLaDA2.0's size and structure, generated (no download): byte-level BPE with
~157k ids, the Ling-2.0 split regex, the LLaDA2 special tokens. For checking what the real one
costs our tokenizer path (load time, memory, tokenizing speed); its merges are synthetic
(letter strings built up one letter at a time), so its ids mean nothing.
"""

from __future__ import annotations

import itertools
import json

from .testmodel import SPECIAL_TOKENS, bpe_tokenizer_json

REAL_SIZE = 157_153  # LLaDA2.0's tokenizer.json ids (the model pads its vocabulary to 157184)
LETTERS = "etaoinshrdlucmfwypvbgkjqxz"


def large_tokenizer_json(size: int = REAL_SIZE) -> str:
    """tokenizer.json text with `size` ids: the 256 byte symbols, merged letter strings (with and
    without a leading space, "Ġ"), then the special tokens."""
    base = json.loads(bpe_tokenizer_json([], vocab_size=256))
    vocab: dict[str, int] = dict(base["model"]["vocab"])
    merges: list[list[str]] = []
    want = size - len(SPECIAL_TOKENS)

    def add(left: str, right: str) -> bool:
        token = left + right
        if token in vocab:
            return True
        if len(vocab) >= want:
            return False
        vocab[token] = len(vocab)
        merges.append([left, right])
        return True

    for letter in LETTERS:  # "Ġa", "Ġb", ...
        add("Ġ", letter)
    frontier = list(LETTERS) + ["Ġ" + letter for letter in LETTERS]
    while len(vocab) < want:  # every string one letter longer than the last round's, in order
        grown = []
        for prefix, letter in itertools.product(frontier, LETTERS):
            if not add(prefix, letter):
                break
            grown.append(prefix + letter)
        frontier = grown
    base["model"]["vocab"] = vocab
    base["model"]["merges"] = merges
    for i, added in enumerate(base["added_tokens"]):
        added["id"] = len(vocab) + i
    return json.dumps(base)
