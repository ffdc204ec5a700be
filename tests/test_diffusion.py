"""Block-diffusion decoder (tide_local.diffusion): against the independent reference, and unit checks."""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest
import torch

from reference_llada2 import ReferenceLLaDA2, reference_generate
from tide_local.converters.testmodel import make_checkpoint
from tide_local.diffusion import (
    BlockEvent,
    BlockModel,
    DecodeOptions,
    DecodeResult,
    StepEvent,
    WindowModel,
    decode,
    iter_decode,
    transfer_schedule,
)
from tide_local.diffusion.sampling import filter_logits, greedy, sample, select_commits

# ----------------------------------------------------------------------------------------------------------
# The tiny random checkpoint and the reference
# ----------------------------------------------------------------------------------------------------------


class MemoReference:
    """The reference model with its forward memoised by input, so the decoder under test and
    reference_generate share the cost of identical windows (identical inputs give identical logits)."""

    def __init__(self, model: ReferenceLLaDA2):
        self.model = model
        self.config = model.config
        self.cache: dict[bytes, torch.Tensor] = {}

    def forward(self, ids, positions=None, *, block_length=32):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if positions is not None:
            assert torch.equal(torch.as_tensor(positions).reshape(-1), torch.arange(ids.numel()))
        key = ids.numpy().tobytes() + bytes([block_length])
        if key not in self.cache:
            self.cache[key] = self.model.forward(ids, block_length=block_length)
        return self.cache[key]

    def logits_fn(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self.forward(torch.from_numpy(tokens.astype(np.int64)))[torch.from_numpy(rows)].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)
    tokenizer = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    ref = MemoReference(ReferenceLLaDA2(directory))
    return {
        "ref": ref,
        "mask": ids["<|mask|>"],
        "eos": ids["<|endoftext|>"],
        "role_end": ids["<|role_end|>"],
        "specials": set(ids.values()),
    }


def _prompt(tiny, length: int, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    lowest_special = min(tiny["specials"])
    return [int(t) for t in rng.integers(0, lowest_special, size=length)]


def _events(model, prompt, options, **kw):
    events = list(iter_decode(model, prompt, options, **kw))
    assert isinstance(events[-1], DecodeResult)
    return events


# (prompt length, max_new_tokens, threshold, steps)
REFERENCE_CASES = {
    "default-threshold": (5, 40, 0.95, 32),  # one token per step
    "low-threshold": (5, 40, 0.03, 32),  # several per step
    "prompt-mid-block": (45, 30, 0.03, 32),
    "prompt-on-boundary": (32, 20, 0.95, 32),
    "prompt-on-boundary-low": (64, 33, 0.03, 32),
    "steps-8-quota-4": (7, 50, 0.95, 8),
    "steps-5-uneven-quota": (7, 40, 0.03, 5),
    "max-new-below-steps": (3, 10, 0.95, 32),  # steps = min(32, 10): quotas 4,4,3,...
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_greedy_matches_reference(tiny, case):
    prompt_len, max_new, threshold, steps = REFERENCE_CASES[case]
    prompt = _prompt(tiny, prompt_len)
    expected, ref_stats = reference_generate(
        tiny["ref"], prompt, max_new, threshold=threshold, steps=steps, block_length=32,
        mask_id=tiny["mask"], eos_ids=[tiny["eos"]], return_stats=True,
    )
    options = DecodeOptions(max_new_tokens=max_new, threshold=threshold, steps=steps)
    events = _events(WindowModel(tiny["ref"].logits_fn), prompt, options, mask_id=tiny["mask"], stop_ids=[tiny["eos"]])
    result = events[-1]
    assert result.tokens == expected
    assert len(result.tokens) == max_new or (result.tokens[-1] == tiny["eos"] and result.stats.finish_reason == "stop")

    # step by step: the same positions, tokens and confidences
    steps_seen = [e for e in events if isinstance(e, StepEvent)]
    assert len(steps_seen) == len(ref_stats.trace) == result.stats.steps == ref_stats.forwards
    for ours, theirs in zip(steps_seen, ref_stats.trace):
        assert (ours.block_index, ours.step) == (theirs.block, theirs.step)
        assert (ours.committed + ours.start).tolist() == theirs.positions
        assert ours.canvas[ours.committed].tolist() == theirs.tokens
        np.testing.assert_allclose(ours.confidences, theirs.confidences, rtol=1e-5)
    assert list(result.stats.steps_per_block) == list(ref_stats.steps_per_block.values())
    if threshold == 0.95 and steps == 32 and max_new >= 32:
        assert all(len(e.committed) == 1 for e in steps_seen)
    if threshold < 0.1:
        assert max(len(e.committed) for e in steps_seen) > 1


def test_stop_id_matches_reference(tiny):
    prompt = _prompt(tiny, 5, seed=2)
    options = DecodeOptions(max_new_tokens=90, threshold=0.03)
    model = WindowModel(tiny["ref"].logits_fn)
    free = decode(model, prompt, options, mask_id=tiny["mask"], stop_ids=[])
    assert free.stats.blocks == 3
    # a token whose first occurrence lies in the second block
    first_seen = {}
    for i, t in enumerate(free.tokens):
        first_seen.setdefault(t, i + len(prompt))
    stop = next(t for t, pos in first_seen.items() if 32 <= pos < 64)
    stop_pos = first_seen[stop] - len(prompt)

    expected = reference_generate(
        tiny["ref"], prompt, 90, threshold=0.03, mask_id=tiny["mask"], eos_ids=[stop, tiny["eos"]]
    )
    result = decode(WindowModel(tiny["ref"].logits_fn), prompt, options, mask_id=tiny["mask"], stop_ids={stop, tiny["eos"]})
    assert result.tokens == expected == free.tokens[: stop_pos + 1]
    assert result.tokens[-1] == stop
    assert result.stats.blocks == 2 and result.stats.finish_reason == "stop"


@pytest.mark.parametrize("filters", [dict(temperature=0.8, top_k=1), dict(temperature=1.0, top_p=1e-6)])
def test_degenerate_sampling_matches_reference(tiny, filters):
    """top_k=1 (or a tiny top_p) leaves one token of probability 1: sampling is deterministic, and the
    confidence 1.0 commits every masked position in one step, exactly as the reference does."""
    prompt = _prompt(tiny, 9, seed=3)
    expected = reference_generate(tiny["ref"], prompt, 50, mask_id=tiny["mask"], eos_ids=[tiny["eos"]], **filters)
    result = decode(
        WindowModel(tiny["ref"].logits_fn), prompt, DecodeOptions(max_new_tokens=50, seed=0, **filters),
        mask_id=tiny["mask"], stop_ids=[tiny["eos"]],
    )
    assert result.tokens == expected
    assert result.stats.steps_per_block == (1, 1)


def test_event_stream_on_reference_model(tiny):
    prompt = _prompt(tiny, 40, seed=4)
    options = DecodeOptions(max_new_tokens=60, threshold=0.03)
    _check_event_stream(WindowModel(tiny["ref"].logits_fn), prompt, options, tiny["mask"])


# ----------------------------------------------------------------------------------------------------------
# Small deterministic numpy models
# ----------------------------------------------------------------------------------------------------------

VOCAB = 128
MASK = 120
EOS = 121
ROLE_END = 122


def table_logits(eos_at: dict[int, int] | None = None, context: float = 0.0, seed: int = 0):
    """A logits function: position r prefers token (7r mod 100) with a position-dependent margin; positions
    in `eos_at` prefer the given stop id. With `context` > 0 every logit also moves with the window's
    tokens, so commit order matters."""
    eos_at = eos_at or {}
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((4096, VOCAB)).astype(np.float32)
    ctx = rng.standard_normal((VOCAB, VOCAB)).astype(np.float32)

    def fn(tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        out = noise[rows].copy()
        best = np.array([eos_at.get(int(r), (7 * int(r)) % 100) for r in rows])
        out[np.arange(rows.size), best] += 6.0 + (rows % 7).astype(np.float32)
        if context:
            hist = np.bincount(tokens, minlength=VOCAB)[:VOCAB].astype(np.float32)
            out += context * (hist @ ctx)[None, :] / max(tokens.size, 1)
        return out

    return fn


class Recorder:
    """A BlockModel wrapper recording every call."""

    def __init__(self, inner: WindowModel):
        self.inner = inner
        self.block_length = inner.block_length
        self.calls: list[tuple] = []

    def prefill(self, tokens):
        self.calls.append(("prefill", np.array(tokens)))
        self.inner.prefill(tokens)

    def block_logits(self, block, start, rows, step=0):
        self.calls.append(("logits", np.array(block), start, np.array(rows), step))
        return self.inner.block_logits(block, start, rows, step)

    def commit_block(self, block, start):
        self.calls.append(("commit", np.array(block), start))
        self.inner.commit_block(block, start)


def test_stop_at_known_position():
    prompt = list(range(10, 20))  # P = 10
    eos_pos = 10 + 40  # generated index 40, in block 1
    model = Recorder(WindowModel(table_logits({eos_pos: EOS})))
    result = decode(model, prompt, DecodeOptions(max_new_tokens=200, threshold=0.9), mask_id=MASK, stop_ids=[EOS])
    assert result.tokens[-1] == EOS and len(result.tokens) == 41
    assert EOS not in result.tokens[:-1]
    assert result.stats.blocks == 2 and result.stats.finish_reason == "stop"
    starts = {c[2] for c in model.calls if c[0] == "logits"}
    assert starts == {0, 32}  # nothing forwarded after the block holding the stop id
    assert [c[2] for c in model.calls if c[0] == "commit"] == [0]  # the last block is not written to the cache


def test_first_of_several_stop_ids_wins():
    prompt = [1, 2, 3]
    fn = table_logits({3 + 20: ROLE_END, 3 + 25: EOS})
    result = decode(WindowModel(fn), prompt, DecodeOptions(max_new_tokens=100), mask_id=MASK, stop_ids=[EOS, ROLE_END])
    assert len(result.tokens) == 21 and result.tokens[-1] == ROLE_END
    only_eos = decode(WindowModel(fn), prompt, DecodeOptions(max_new_tokens=100), mask_id=MASK, stop_ids=[EOS])
    assert len(only_eos.tokens) == 26 and only_eos.tokens[-1] == EOS and ROLE_END in only_eos.tokens
    no_stop = decode(WindowModel(fn), prompt, DecodeOptions(max_new_tokens=100), mask_id=MASK, stop_ids=())
    assert len(no_stop.tokens) == 100 and no_stop.stats.finish_reason == "length"
    assert no_stop.stats.blocks == 4  # ceil(103 / 32)


def test_stop_id_past_max_new_tokens_is_cut():
    """Positions past max_new_tokens in the last block are decoded but not returned."""
    prompt = [5] * 4
    result = decode(
        WindowModel(table_logits({4 + 30: EOS})), prompt, DecodeOptions(max_new_tokens=20),
        mask_id=MASK, stop_ids=[EOS],
    )
    assert len(result.tokens) == 20 and EOS not in result.tokens
    assert result.stats.finish_reason == "length"


def test_block_answers_add_up_to_the_answer_and_stop_at_the_stop_id():
    prompt = list(range(10, 20))
    events = list(iter_decode(WindowModel(table_logits({10 + 40: EOS})), prompt, DecodeOptions(max_new_tokens=200),
                              mask_id=MASK, stop_ids=[EOS]))
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    assert [len(b.answer) for b in blocks] == [22, 19]  # prompt tail cut from the first, stop id ends the second
    assert blocks[-1].answer[-1] == EOS
    assert np.concatenate([b.answer for b in blocks]).tolist() == events[-1].tokens


def test_cancel_ends_with_the_finished_blocks():
    import threading

    prompt, options = [1, 2, 3], DecodeOptions(max_new_tokens=100)
    cancel = threading.Event()
    events = []
    for event in iter_decode(WindowModel(table_logits()), prompt, options, mask_id=MASK, stop_ids=[], cancel=cancel):
        events.append(event)
        if isinstance(event, StepEvent) and event.block_index == 1:
            cancel.set()  # the consumer cancels in the middle of the second block
    result = events[-1]
    assert result.stats.finish_reason == "cancelled"
    assert sum(isinstance(e, StepEvent) and e.block_index == 1 for e in events) == 1  # no step after the cancel
    first = [e for e in events if isinstance(e, BlockEvent)]
    assert len(first) == 1 and result.stats.blocks == 1 and result.tokens == first[0].answer.tolist()
    full = decode(WindowModel(table_logits()), prompt, options, mask_id=MASK, stop_ids=[])
    assert full.tokens[:29] == result.tokens and len(result.tokens) == 29


def test_options_table_drives_flags_validation_and_defaults():
    import argparse

    from tide_local.diffusion.options import OptionValueError, add_decoding_arguments, flag_of, option_specs

    specs = option_specs()
    assert set(specs) == {f.name for f in dataclasses.fields(DecodeOptions)}
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser, max_new_tokens=7)
    args = parser.parse_args([])
    flagged = [n for n, s in specs.items() if s.flag]
    assert "block_length" not in flagged and set(flagged) <= set(vars(args))
    assert args.max_new_tokens == 7 and all(getattr(args, n) is None for n in flagged if n != "max_new_tokens")
    assert parser.parse_args(["-n", "3", "--top-k", "5"]).top_k == 5
    assert flag_of("max_new_tokens") == "-n/--max-new-tokens" and flag_of("top_p") == "--top-p"
    # the model's defaults apply where nothing is given; None means "not given"
    opts = DecodeOptions.build({"threshold": None, "top_k": 3}, {"threshold": 0.5, "steps": 16, "block_length": 32})
    assert (opts.threshold, opts.steps, opts.top_k) == (0.5, 16, 3)
    with pytest.raises(TypeError, match="unknown generation option: speed"):
        DecodeOptions.build({"speed": 2})
    with pytest.raises(OptionValueError) as err:
        DecodeOptions.build({"top_p": 2.0})
    assert err.value.name == "top_p" and "top_p must be in (0, 1]" in str(err.value)


def test_stop_id_in_prompt_tail_is_ignored():
    prompt = [4, EOS, 6]
    result = decode(WindowModel(table_logits()), prompt, DecodeOptions(max_new_tokens=50), mask_id=MASK, stop_ids=[EOS])
    assert len(result.tokens) == 50 and result.stats.blocks == 2


def test_model_protocol_calls():
    prompt = list(range(70))  # two full blocks + a tail of 6
    model = Recorder(WindowModel(table_logits(context=2.0)))
    decode(model, prompt, DecodeOptions(max_new_tokens=60, threshold=0.9), mask_id=MASK, stop_ids=[])
    kind, tokens = model.calls[0]
    assert kind == "prefill" and tokens.dtype == np.int32 and tokens.tolist() == prompt[:64]
    assert all(c[0] != "prefill" for c in model.calls[1:])
    steps = {}
    for call in model.calls:
        if call[0] == "logits":
            _, block, start, rows, step = call
            assert block.dtype == np.int32 and block.shape == (32,)
            assert rows.tolist() == np.flatnonzero(block == MASK).tolist()
            assert start % 32 == 0 and (start + rows >= 70).all()
            assert step == steps.get(start, 0)  # the decoder says which step of the block this is
            steps[start] = step + 1
    commits = [c for c in model.calls if c[0] == "commit"]
    assert [c[2] for c in commits] == [64, 96]  # blocks 2, 3; block 4 (last) is not committed
    assert commits[0][1][:6].tolist() == prompt[64:]
    assert all((c[1] != MASK).all() for c in commits)


def test_prompt_mask_tokens_are_never_candidates():
    prompt = [3, MASK, 4]
    result = decode(WindowModel(table_logits()), prompt, DecodeOptions(max_new_tokens=10), mask_id=MASK, stop_ids=[])
    assert len(result.tokens) == 10 and MASK not in result.tokens


def test_padded_vocabulary_argmax_is_kept():
    def fn(tokens, rows):
        out = np.zeros((len(rows), VOCAB), dtype=np.float32)
        out[:, VOCAB - 1] = 5.0  # a row past any tokenizer
        return out

    result = decode(WindowModel(fn), [1], DecodeOptions(max_new_tokens=8), mask_id=MASK, stop_ids=[])
    assert result.tokens == [VOCAB - 1] * 8


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


def _sampled(seed, **kw):
    options = DecodeOptions(max_new_tokens=70, temperature=1.3, threshold=0.5, seed=seed, **kw)
    return decode(WindowModel(table_logits(context=1.0)), [9, 8, 7], options, mask_id=MASK, stop_ids=[])


def test_sampling_reproducible_by_seed():
    a, b, c = _sampled(11), _sampled(11), _sampled(12)
    assert a.tokens == b.tokens and a.stats.steps_per_block == b.stats.steps_per_block
    assert a.tokens != c.tokens
    assert _sampled(11, top_k=20, top_p=0.8).tokens == _sampled(11, top_k=20, top_p=0.8).tokens


def test_top_k_1_sampling_equals_greedy_tokens():
    """On a model whose logits do not depend on the context the commit order cannot change the tokens."""
    fn = table_logits()
    greedy_result = decode(WindowModel(fn), [1, 2], DecodeOptions(max_new_tokens=64), mask_id=MASK, stop_ids=[])
    for seed in (0, 1):
        sampled = decode(
            WindowModel(fn), [1, 2], DecodeOptions(max_new_tokens=64, temperature=0.7, top_k=1, seed=seed),
            mask_id=MASK, stop_ids=[],
        )
        assert sampled.tokens == greedy_result.tokens


def test_filters_ignored_at_temperature_zero():
    fn = table_logits(context=1.0)
    plain = decode(WindowModel(fn), [1, 2], DecodeOptions(max_new_tokens=40), mask_id=MASK, stop_ids=[])
    filtered = decode(
        WindowModel(fn), [1, 2], DecodeOptions(max_new_tokens=40, top_k=3, top_p=0.2, seed=5), mask_id=MASK, stop_ids=[]
    )
    assert plain.tokens == filtered.tokens and plain.stats.steps == filtered.stats.steps


def test_greedy_confidence_is_softmax_of_argmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 1000)) * 4).astype(np.float32)
    logits[2, 10] = logits[2, 20] = logits[2].max() + 1  # tie: lowest id
    tokens, conf = greedy(logits)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    assert tokens.tolist() == probs.argmax(axis=1).tolist() and tokens[2] == 10
    np.testing.assert_allclose(conf, probs.max(axis=1), rtol=1e-6)


def _naive_filter(row, temperature, top_k, top_p):
    x = row.astype(np.float64) / temperature
    if top_k is not None and top_k < x.size:
        x[x < np.sort(x)[-top_k]] = -np.inf
    if top_p is not None and top_p < 1:
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.argmax(cum > top_p)) + 1] if (cum > top_p).any() else order
        mask = np.ones(x.size, dtype=bool)
        mask[keep] = False
        x[mask] = -np.inf
    return x


@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (50, None), (300, 0.95), (None, 0.999), (None, 0.3), (5, 1.0)])
def test_filters_match_full_sort(top_k, top_p):
    rng = np.random.default_rng(1)
    logits = np.concatenate(
        [
            (rng.standard_normal((4, 2000)) * 3).astype(np.float32),  # peaked rows
            (rng.standard_normal((3, 2000)) * 0.05).astype(np.float32),  # near-flat: top-p needs > 256 tokens
        ]
    )
    logits[0, 7] = 40.0  # a single token above any top_p
    got = filter_logits(logits, 0.9, top_k, top_p)
    for i in range(logits.shape[0]):
        want = _naive_filter(logits[i], 0.9, top_k, top_p)
        assert np.array_equal(np.isfinite(got[i]), np.isfinite(want)), i
        np.testing.assert_allclose(got[i][np.isfinite(got[i])], want[np.isfinite(want)], rtol=1e-12)


def test_top_k_keeps_ties():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 0.5]], dtype=np.float32)
    kept = np.isfinite(filter_logits(logits, 1.0, top_k=1))[0]
    assert kept.tolist() == [False, True, False, True, False]


def test_sample_follows_the_distribution():
    p = np.array([0.5, 0.3, 0.2, 0.0])
    logits = np.tile(np.log(np.maximum(p, 1e-300)).astype(np.float32), (20000, 1))
    logits[:, 3] = -np.inf
    tokens, conf = sample(logits, np.random.default_rng(0), 1.0)
    freq = np.bincount(tokens, minlength=4) / tokens.size
    np.testing.assert_allclose(freq, p, atol=0.015)
    np.testing.assert_allclose(conf, p[tokens], rtol=1e-6)


def test_select_commits_rule():
    conf = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert select_commits(conf, 0.8, 1).tolist() == [1, 3]  # all above when >= quota
    assert select_commits(conf, 0.8, 2).tolist() == [1, 3]
    assert select_commits(conf, 0.8, 3).tolist() == [1, 2, 3]  # else top-quota
    assert select_commits(conf, 0.9, 1).tolist() == [1]  # strictly above; tie -> lowest position
    assert select_commits(conf, 0.95, 10).tolist() == [0, 1, 2, 3, 4]
    assert select_commits(conf, 0.95, 0).tolist() == []


def test_transfer_schedule():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(32, 5) == [7, 7, 6, 6, 6]
    assert transfer_schedule(32, 10) == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]
    assert sum(transfer_schedule(32, 7)) == 32


# ----------------------------------------------------------------------------------------------------------
# Options and errors
# ----------------------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.01), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(steps=0), "steps"),
    (dict(block_length=0), "block_length"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"),
]


@pytest.mark.parametrize("bad,name", BAD_OPTIONS, ids=[f"{k}={v}" for k, v in (next(iter(b.items())) for b, _ in BAD_OPTIONS)])
def test_bad_options_raise(bad, name):
    options = DecodeOptions(**bad)
    with pytest.raises(ValueError, match=name):
        options.validate()
    model = Recorder(WindowModel(table_logits()))
    with pytest.raises(ValueError, match=name):
        iter_decode(model, [1, 2], options, mask_id=MASK, stop_ids=[])
    assert model.calls == []  # raised before touching the model


def test_good_edge_options_validate():
    DecodeOptions(threshold=1.0, top_p=1.0, top_k=1, steps=100, temperature=0.0, seed=0).validate()


def test_bad_prompt_and_model_raise():
    model = WindowModel(table_logits())
    with pytest.raises(ValueError, match="empty"):
        decode(model, [], DecodeOptions(), mask_id=MASK, stop_ids=[])
    with pytest.raises(ValueError, match="prompt"):
        decode(model, [[1, 2]], DecodeOptions(), mask_id=MASK, stop_ids=[])
    with pytest.raises(ValueError, match="block_length"):
        decode(WindowModel(table_logits(), block_length=16), [1], DecodeOptions(), mask_id=MASK, stop_ids=[])
    with pytest.raises(ValueError, match="multiple"):
        model.prefill(np.zeros(5, dtype=np.int32))


def test_steps_above_block_length():
    """steps > block_length: quotas of 0 after the first 32 steps; every block still completes."""
    result = decode(
        WindowModel(table_logits(context=1.0)), [1], DecodeOptions(max_new_tokens=40, steps=64), mask_id=MASK, stop_ids=[]
    )
    assert len(result.tokens) == 40 and MASK not in result.tokens


def test_window_model_is_a_block_model():
    assert isinstance(WindowModel(table_logits()), BlockModel)


# ----------------------------------------------------------------------------------------------------------
# Event stream
# ----------------------------------------------------------------------------------------------------------


def _check_event_stream(model, prompt, options, mask_id):
    events = _events(model, prompt, options, mask_id=mask_id, stop_ids=[])
    result = events[-1]
    assert all(not isinstance(e, DecodeResult) for e in events[:-1])
    B, P = options.block_length, len(prompt)
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    assert [b.block_index for b in blocks] == list(range(P // B, P // B + len(blocks)))

    pending: list[StepEvent] = []
    for event in events[:-1]:
        if isinstance(event, StepEvent):
            pending.append(event)
            continue
        block = event
        assert block.start == block.block_index * B and block.steps == len(pending)
        assert all(s.block_index == block.block_index and s.start == block.start for s in pending)
        assert [s.step for s in pending] == list(range(len(pending)))
        # committed positions partition the block's masked positions
        masked = np.flatnonzero(np.arange(block.start, block.start + B) >= P)
        committed = np.concatenate([s.committed for s in pending])
        assert sorted(committed.tolist()) == masked.tolist()
        # canvases only ever lose masks, committed tokens never change, the last canvas is the block
        previous = np.full(B, mask_id)
        previous[: max(0, P - block.start)] = prompt[block.start : block.start + B][: max(0, P - block.start)]
        for s in pending:
            assert len(s.confidences) == len(s.committed) > 0
            was_masked = previous == mask_id
            assert np.array_equal(s.canvas[~was_masked], previous[~was_masked])
            assert (s.canvas[s.committed] != mask_id).all() and was_masked[s.committed].all()
            assert np.array_equal(s.canvas == mask_id, was_masked & ~np.isin(np.arange(B), s.committed))
            previous = s.canvas
        assert np.array_equal(previous, block.tokens)
        pending = []
    assert pending == []

    stats = result.stats
    n_steps = sum(isinstance(e, StepEvent) for e in events)
    assert stats.steps == n_steps == sum(stats.steps_per_block)
    assert stats.blocks == len(blocks) == len(stats.steps_per_block)
    assert list(stats.steps_per_block) == [b.steps for b in blocks]
    assert stats.tokens == len(result.tokens) == options.max_new_tokens
    assert stats.tokens_per_step == pytest.approx(stats.tokens / stats.steps)
    assert stats.tokens_per_second == pytest.approx(stats.tokens / stats.seconds)
    assert 0 <= stats.prefill_seconds <= stats.seconds
    assert stats.prompt_tokens == P
    canvas = np.concatenate([b.tokens for b in blocks])
    assert result.tokens == canvas[P - blocks[0].start :][: options.max_new_tokens].tolist()
    # the blocks' answers are the answer, cut where it is
    assert np.concatenate([b.answer for b in blocks]).tolist() == result.tokens


@pytest.mark.parametrize("prompt_len", [1, 32, 50])
def test_event_stream(prompt_len):
    prompt = [int(t) for t in np.arange(prompt_len) % 100]
    options = DecodeOptions(max_new_tokens=75, threshold=0.9)
    _check_event_stream(WindowModel(table_logits(context=1.5)), prompt, options, MASK)
