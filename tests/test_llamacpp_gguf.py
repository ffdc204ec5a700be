"""LLaDA2 GGUFs from llama.cpp's converter (`LLaDA2MoeModel`, PR #17454): same tensors as ours,
metadata without tide.* keys, without tokenizer.huggingface.json (the tokenizer only in
tokenizer.ggml.*), with llama.cpp's keys and its alignment of 32. Without llama.cpp here, such a
file is made from one of ours (`llamacpp_style`); it must load, generate exactly what ours
generates, and tokenize exactly as the checkpoint's Hugging Face tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf_copy import rewrite_gguf
from gguf import GGUFValueType as V, TokenType
from tokenizers import Tokenizer as HFTokenizer

import tide_local
from tide_local import architecture
from tide_local.cli import main as tide
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint, special_token_ids
from tide_local.errors import GGUFError
from tide_local.gguf import GGUFFile, GGUFStreamWriter
from tide_local.modelfile import ModelFile
from tide_local.tokenizer import BAILING_SPLIT, Tokenizer, tokenizer_json_from_ggml

# What llama.cpp's LLaDA2 converter does not write, and what it writes that tide's did not.
NOT_IN_LLAMACPP = ("llada2.attention.causal", "tokenizer.ggml.eot_token_id", "tokenizer.huggingface.json")
LLAMACPP_ALIGNMENT = 32

# Code, numbers, whitespace runs, CJK, emoji, contractions, special and added tokens in text.
VARIED_TEXT = (
    "def add(a, b):\n    return a + b  # 12345 + 0.5e-6\n\n\n\t\t  x = [1,2,3]\r\n"
    "    \n   trailing spaces   \n"
    "The tide's in; we'll see. DON'T Stop! I'M here, you'Re there.\n"
    "中文分词测试：潮汐。日本語のテキスト、한국어 텍스트.\n"
    "emoji 😀🎉👍🏽 and flags 🇫🇷, symbols ©®™ ∑∫√ ≠ ≤ → ←, accents naïve café Ångström\n"
    "<|startoftext|><role>HUMAN</role>What is 2+2?<|role_end|><role>ASSISTANT</role><think>4</think>"
    "<|mask|><|mask|> <|endoftext|>\n"
    "numbers 2025-11-28 12:30 $5.00 50% 1,000,000 ½ ٣٤ ௰\n"
    "   leading spaces, tabs\tand\u00a0no-break\u3000ideographic space"
)


def llamacpp_style(src: Path, dst: Path, *, size_label: str = "16x64K") -> Path:
    """Copy one of our GGUFs as llama.cpp's converter would have written it: the same tensors
    (bytes unchanged, alignment 32), no tide.* keys, none of NOT_IN_LLAMACPP, plus the keys it
    writes that ours did not (general.type, general.size_label and, should `src` predate them,
    the value length and the shared experts' width)."""
    with ModelFile(src) as m:
        g, cfg = m.gguf, m.config
        with GGUFStreamWriter(dst, alignment=LLAMACPP_ALIGNMENT) as w:
            for key, value in g.metadata.items():
                if key == "general.alignment" or key.startswith("tide.") or key in NOT_IN_LLAMACPP:
                    continue
                vtype, item_type = g.value_types[key]
                w.add(key, value, vtype, item_type)
                if key == "general.architecture":
                    w.add("general.type", "model", V.STRING)
                    w.add("general.size_label", size_label, V.STRING)
            for key, value in cfg.derived_gguf_metadata().items():
                if key not in g.metadata:
                    w.add(key, value, V.UINT32)
            for t in g.tensors.values():
                w.add_tensor(t.name, t.ne, t.ggml_type)
            w.begin_data()
            for t in g.tensors.values():
                w.write(t.name, g.tensor_data(t.name))
            w.finish()
    return dst


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", preset="tiny", seed=17)


@pytest.fixture(scope="module")
def ours(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf"
    convert(checkpoint, path, "q8_0", progress=False)
    return path


@pytest.fixture(scope="module")
def theirs(ours, tmp_path_factory):
    return llamacpp_style(ours, tmp_path_factory.mktemp("llamacpp") / "tiny-llamacpp.gguf")


# -- the file -------------------------------------------------------------------------------------
def test_our_converter_writes_what_llamacpp_reads(ours):
    with ModelFile(ours) as m:
        md, cfg = m.gguf.metadata, m.config
        assert md["general.type"] == "model"
        assert md["llada2.attention.value_length"] == cfg.head_dim == md["llada2.attention.key_length"]
        assert md["llada2.expert_shared_feed_forward_length"] == cfg.expert_ffn_dim * cfg.n_shared_experts
        assert m.has_tide_keys and m.expert_stacks_page_aligned()


def test_the_llamacpp_style_file_is_what_the_issue_describes(theirs, ours):
    with GGUFFile(theirs) as g, GGUFFile(ours) as o:
        md = g.metadata
        assert g.alignment == LLAMACPP_ALIGNMENT and "general.alignment" not in md
        assert not any(k.startswith("tide.") for k in md)
        assert not any(k in md for k in NOT_IN_LLAMACPP)
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "bailingmoe2"
        assert {k: (v.ne, v.ggml_type) for k, v in g.tensors.items()} == \
               {k: (v.ne, v.ggml_type) for k, v in o.tensors.items()}
        experts = g.tensors[architecture.expert_tensor_name(1, "up")]
        assert experts.offset % 4096  # not page-aligned: what a file of llama.cpp's looks like
        assert bytes(g.tensor_data(experts.name)) == bytes(o.tensor_data(experts.name))


def test_it_opens_with_llamacpp_ids_and_the_familys_defaults(theirs, ours):
    with ModelFile(theirs) as m, ModelFile(ours) as o:
        assert m.config == o.config
        assert m.special_ids == o.special_ids  # role_end by content: the file has no eot_token_id
        assert m.special_ids["role_end"] == special_token_ids()["<|role_end|>"]
        assert m.decoding_defaults() == {"block_length": architecture.DEFAULT_BLOCK_LENGTH,
                                         "steps": architecture.DEFAULT_STEPS,
                                         "threshold": architecture.DEFAULT_THRESHOLD}
        assert not m.has_tide_keys and not m.expert_stacks_page_aligned()
        for layer in m.config.moe_layers:
            for proj in architecture.EXPERT_PROJECTIONS:
                assert m.experts(layer, proj).slice_bytes == o.experts(layer, proj).slice_bytes


def test_generation_is_exactly_ours(theirs, ours):
    prompt = "The tide comes in twice a day. How many apples"
    with tide_local.load(ours, device="cpu", threads=2) as a:
        want = a.generate(prompt, max_new_tokens=24, threshold=0.5)
        want_chat = a.chat_prompt([{"role": "user", "content": "Hi <|mask|> there"}])
    with tide_local.load(theirs, device="cpu", threads=2) as b:
        got = b.generate(prompt, max_new_tokens=24, threshold=0.5)
        assert b.chat_prompt([{"role": "user", "content": "Hi <|mask|> there"}]) == want_chat
        assert b.chat_stop_ids() == [b.eos_id, special_token_ids()["<|role_end|>"]]
    assert got.tokens == want.tokens and got.text == want.text


def test_uploads_from_an_unaligned_file_are_the_experts_bytes(theirs, ours):
    """The offload copies slices out of the mapping at any offset: on the emulated device the
    same prompt gives the same tokens as the CPU with the file's own layout."""
    with tide_local.load(ours, device="cpu", threads=2) as a:
        want = a.generate("Numbers and dates: 1999, 2024", max_new_tokens=16, threshold=0.5).tokens
    with tide_local.load(theirs, device="emulated", expert_slots=4, policy="lru", threads=2) as b:
        got = b.generate("Numbers and dates: 1999, 2024", max_new_tokens=16, threshold=0.5)
        assert got.stats.offload is not None and got.stats.offload.uploads > 0
    assert got.tokens == want


# -- the tokenizer --------------------------------------------------------------------------------
def test_the_split_regex_is_the_checkpoints(checkpoint):
    """The test checkpoints' tokenizer.json has the Ling/LLaDA2 pre-tokenizer; llama-vocab.cpp
    quotes the same regex as the original of LLAMA_VOCAB_PRE_TYPE_BAILINGMOE ("bailingmoe2")."""
    pre = json.loads((checkpoint / "tokenizer.json").read_text())["pre_tokenizer"]["pretokenizers"]
    assert pre[0]["type"] == "Split" and pre[0]["pattern"]["Regex"] == BAILING_SPLIT
    assert pre[0]["behavior"] == "Isolated" and pre[1] == {"type": "ByteLevel", "add_prefix_space": False,
                                                           "trim_offsets": True, "use_regex": False}


def test_tokenizer_from_ggml_keys_gives_the_hf_ids(checkpoint, theirs):
    hf = HFTokenizer.from_file(str(checkpoint / "tokenizer.json"))  # the checkpoint's own, as transformers loads it
    with GGUFFile(theirs) as g:
        tok = Tokenizer.from_gguf(g, vocab_size=704)
    for text in (VARIED_TEXT, *VARIED_TEXT.splitlines(keepends=True), " ", "\n\n", "a" * 300, "'s'S'll"):
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    ids = tok.encode(VARIED_TEXT)
    special = special_token_ids()
    assert special["<|mask|>"] in ids and special["<role>"] in ids and special["<think>"] in ids
    assert tok.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False) == VARIED_TEXT
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)  # CONTROL tokens skipped, <think> kept
    assert tok.size == hf.get_vocab_size(with_added_tokens=True)
    assert tok.max_token_bytes == Tokenizer(hf.to_str()).max_token_bytes


def _ggml_keys(path) -> dict:
    with GGUFFile(path) as g:
        return {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}


def test_token_ids_stay_where_the_file_has_them(theirs):
    """An added token after unused rows keeps its id (`tokenizers` would renumber it)."""
    md = _ggml_keys(theirs)
    tokens, types = list(md["tokenizer.ggml.tokens"]), np.array(md["tokenizer.ggml.token_type"])
    role_end = special_token_ids()["<|role_end|>"]
    tokens[700], types[700] = tokens[role_end], types[role_end]
    tokens[role_end], types[role_end] = f"[PAD{role_end}]", int(TokenType.UNUSED)
    md.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types})
    tok = Tokenizer(tokenizer_json_from_ggml(md.get, "f.gguf"), vocab_size=704)
    assert tok.token_id("<|role_end|>") == 700 and tok.encode("a<|role_end|>")[-1] == 700
    assert tok.decode([700]) == ""  # still CONTROL: skipped


@pytest.mark.parametrize("change, match", [
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model is 'llama'; a LLaDA2 tokenizer is byte-level BPE"),
    ({"tokenizer.ggml.pre": "qwen2"}, "tokenizer.ggml.pre is 'qwen2', a pre-tokenizer tide does not know"),
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges is missing"),
    ({"tokenizer.ggml.merges": ["Ġt"]}, "tokenizer.ggml.merges entry 0 .* is not two tokens"),
    ({"tokenizer.ggml.merges": ["Ġ zz"]}, "the stored tokenizer cannot be loaded"),
    ({"tokenizer.ggml.token_type": np.ones(3, np.int32)}, "tokenizer.ggml.token_type has 3 entries for 704 tokens"),
    ({"tokenizer.ggml.model": None}, "no tokenizer: neither tokenizer.huggingface.json nor tokenizer.ggml.model"),
    ({"tokenizer.ggml.tokens": ["x" * (70 << 20)]}, "the tokenizer in tokenizer.ggml.* would be 70 MiB of JSON"),
])
def test_bad_ggml_tokenizer_keys_are_one_gguf_error(theirs, change, match):
    md = _ggml_keys(theirs)
    md.update(change)
    if "tokenizer.ggml.tokens" in change:
        md["tokenizer.ggml.token_type"] = None
    with pytest.raises(GGUFError, match=f"f.gguf: {match}"):
        Tokenizer(tokenizer_json_from_ggml(md.get, "f.gguf"), source="f.gguf")


def test_a_vocabulary_larger_than_the_model_is_refused(theirs):
    md = _ggml_keys(theirs)
    with pytest.raises(GGUFError, match="f.gguf: .* 648 token ids but the model's vocabulary has 600"):
        Tokenizer(tokenizer_json_from_ggml(md.get, "f.gguf"), vocab_size=600, source="f.gguf")


# -- metadata llama.cpp reads ---------------------------------------------------------------------
@pytest.mark.parametrize("key, value, match", [
    ("llada2.attention.value_length", 32, "value_length is 32 but the other keys make it 64"),
    ("llada2.expert_shared_feed_forward_length", 128, "expert_shared_feed_forward_length is 128 but the other"),
    ("llada2.attention.value_length", "64", "value_length has GGUF type STRING"),
    ("tokenizer.ggml.token_type", ["a", "b"], "token_type has GGUF type ARRAY of STRING .* expected an array of int"),
    ("tokenizer.ggml.merges", [1, 2], "merges has GGUF type ARRAY of UINT32 .* expected an array of strings"),
    ("tokenizer.ggml.pre", 2, "pre has GGUF type UINT32 .* expected a string"),
])
def test_llamacpp_keys_that_disagree_are_refused(theirs, tmp_path, key, value, match):
    with pytest.raises(GGUFError, match=match):
        ModelFile(rewrite_gguf(theirs, tmp_path / "b.gguf", metadata={key: value}))


def test_an_unknown_pre_tokenizer_is_refused_at_load(theirs, tmp_path):
    path = rewrite_gguf(theirs, tmp_path / "b.gguf", metadata={"tokenizer.ggml.pre": "gpt-4o"})
    with pytest.raises(GGUFError, match="b.gguf: tokenizer.ggml.pre is 'gpt-4o', a pre-tokenizer tide does not know"):
        tide_local.load(path, device="cpu", threads=1)


# -- tide info ------------------------------------------------------------------------------------
def test_tide_info_shows_it(theirs, capsys):
    assert tide(["info", str(theirs)]) == 0
    out = capsys.readouterr().out
    assert "llada2" in out and "layers 4 (1 dense)" in out
    assert f"role_end {special_token_ids()['<|role_end|>']}" in out
    assert "decoding defaults: block 32, steps 32, threshold 0.95" in out
    assert "no tide.* keys" in out and "not page-aligned" in out
    assert tide(["info", str(theirs), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["alignment"] == 32 and d["expert_stacks_page_aligned"] is False and d["tide_keys"] is False
