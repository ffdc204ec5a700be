"""Tokenizers for the generated test models (no download).

* The test models' own: byte-level BPE of 640 ids trained on a small corpus, the Ling-2.0 split
  regex, the LLaDA2 special tokens and chat template (`build_tokenizer`, `tokenizer_config`).
* One of LLaDA2.0's size and structure (`large_tokenizer_json`): ~157k ids, for checking what
  the real one costs our tokenizer path (load time, memory, tokenizing speed); its merges are
  synthetic (letter strings built up one letter at a time), so its ids mean nothing.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Mapping

# ---------------------------------------------------------------------------------------
# The test models' tokenizer (spec §5): byte-level BPE of 640 ids, the LLaDA2 special tokens,
# the Ling-2.0 chat template
# ---------------------------------------------------------------------------------------

# Added tokens, in id order right after the BPE vocabulary: (content, special).
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|startoftext|>", True),
    ("<|endoftext|>", True),
    ("<|mask|>", True),
    ("<|role_end|>", True),
    ("<role>", True),
    ("</role>", True),
    ("<think>", False),
    ("</think>", False),
)

_BPE_VOCAB_SIZE = 640  # 256 byte symbols + 384 merges

# Ling-2.0 / bailingmoe2 pre-tokenizer split: contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newlines, whitespace.
_SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)

_CORPUS = """\
The tide comes in twice a day. On the north shore the water rises about three metres,
and the fishermen know the hours by heart: they leave at dawn, return before noon, and
mend their nets while the harbour drains. Children run across the wet sand looking for
crabs, shells and the small green stones that glitter when the sun is low.

How many apples are left if Harry has 5 apples and eats 2? He has 3 apples left. If a
train travels 120 kilometres in 2 hours, its average speed is 60 km/h. The sum of the
first 10 positive integers is 55, and 2 + 2 = 4, 7 * 8 = 56, 100 / 4 = 25.

Please write a short summary of the meeting. The team agreed that the new model should
run on a single machine with one graphics card. Experts that are not resident on the
device are computed on the processor, and the planner decides how often the resident set
is refreshed. Everyone said the results were "surprisingly good" - but we'll measure it.

Once upon a time, in a quiet village between two hills, there lived an old clockmaker.
Every morning she opened her shop, wound every clock on the wall, and listened. When all
of them ticked together she smiled; when one of them was late, she took it apart, cleaned
each wheel, and put it back. "Time," she liked to say, "is only a matter of patience."

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

Question: What is the capital of France? Answer: Paris is the capital of France.
Question: Why is the sky blue? Answer: Sunlight is scattered by the molecules of the air,
and blue light, with its shorter wavelength, is scattered much more than red light.
Question: Can you list three causes of ocean tides? Answer: The gravity of the Moon, the
gravity of the Sun, and the rotation of the Earth all shape the tides we observe.

Dear friend, thank you for your letter. I'm glad you're well and that the garden is
growing. We've had rain all week, so the river is high and the roads are muddy. I'll
visit you in May, if the weather allows, and I'd like to bring the book you asked about.
Write soon! Your friend, Anna.

Numbers and dates: 1999, 2024, 3.14159, 42, 0.5, 1e-6, 157184, 12:30, 2025-11-28.
Symbols: (a), [b], {c}, <d>, #tag, @name, $5.00, 50%, a_b, x^2, ~/path/to/file.txt
"""


def bpe_tokenizer_json(lines: list[str], vocab_size: int, min_frequency: int = 1) -> str:
    """A LLaDA2-style tokenizer trained on `lines`: byte-level BPE (at most `vocab_size` ids,
    merges of pairs seen at least `min_frequency` times) with the Ling-2.0 split regex, then the
    added tokens of :data:`SPECIAL_TOKENS`; as tokenizer.json text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(lines, trainer)
    for content, special in SPECIAL_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer.to_str()


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    text = bpe_tokenizer_json(_CORPUS.splitlines(keepends=True), _BPE_VOCAB_SIZE)
    from tokenizers import Tokenizer

    size = Tokenizer.from_str(text).get_vocab_size(with_added_tokens=False)
    if size != _BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE training gave {size} ids, expected {_BPE_VOCAB_SIZE}")
    return text


def build_tokenizer():
    """The test tokenizer (a fresh ``tokenizers.Tokenizer``): byte-level BPE with 640
    ids, then the added tokens of :data:`SPECIAL_TOKENS` (ids 640..647)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json())


@functools.lru_cache(maxsize=1)
def _special_token_ids() -> tuple[tuple[str, int], ...]:
    tokenizer = build_tokenizer()
    return tuple((content, tokenizer.token_to_id(content)) for content, _ in SPECIAL_TOKENS)


def special_token_ids() -> dict[str, int]:
    """Added token content → id in the test tokenizer."""
    return dict(_special_token_ids())


# Ling-2.0 style: a system turn that always ends with "detailed thinking off", then one
# <role>…</role> header per turn, every turn closed by <|role_end|>.
CHAT_TEMPLATE = (
    "{%- set thinking_option = 'off' -%}\n"
    "{{- '<role>SYSTEM</role>' -}}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "    {{- messages[0]['content'] + '\\n' -}}\n"
    "{%- endif -%}\n"
    "{{- 'detailed thinking ' + thinking_option + '<|role_end|>' -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- set content = message['content'] if message['content'] is string else '' -%}\n"
    "    {%- if message['role'] == 'user' -%}\n"
    "        {{- '<role>HUMAN</role>' + content + '<|role_end|>' -}}\n"
    "    {%- elif message['role'] == 'system' and not loop.first -%}\n"
    "        {{- '<role>SYSTEM</role>' + content + '<|role_end|>' -}}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    "        {{- '<role>ASSISTANT</role>' + content + '<|role_end|>' -}}\n"
    "    {%- elif message['role'] == 'tool' -%}\n"
    "        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}\n"
    "            {{- '<role>OBSERVATION</role>' -}}\n"
    "        {%- endif -%}\n"
    "        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}\n"
    "        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}\n"
    "            {{- '<|role_end|>' -}}\n"
    "        {%- endif -%}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<role>ASSISTANT</role>' -}}\n"
    "{%- endif -%}\n"
)


def tokenizer_config(config: Mapping[str, Any], tokenizer) -> dict[str, Any]:
    decoder = {}
    for content, special in SPECIAL_TOKENS:
        decoder[str(tokenizer.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|startoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "extra_special_tokens": {},
        "mask_token": "<|mask|>",
        "model_max_length": config["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# ---------------------------------------------------------------------------------------
# One of LLaDA2.0's size
# ---------------------------------------------------------------------------------------

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
