"""Batched decoding: each sequence of a batch gets exactly its solo decode, on a table model
(the driver alone) and on the engine (one forward over several sequences' KV caches)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import tide_local
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.diffusion import BlockEvent, DecodeOptions, DecodeResult, StepEvent, WindowModel, iter_decode
from tide_local.diffusion.batch import BatchDecoder, SequenceFailed
from tide_local.errors import BudgetError, ContextError
from tide_local.experts.memory import plan_memory
from tide_local.results import GenerationResult

VOCAB, MASK, EOS, B = 64, 60, 61, 8


def context_logits(tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Logits that depend on every token of the window and on the row: commit order matters."""
    rows = np.asarray(rows)
    seed = int(np.sum(tokens.astype(np.int64) * (np.arange(tokens.size) + 1)) % 100003)
    out = np.random.default_rng(seed).standard_normal((rows.size, VOCAB)).astype(np.float32)
    out[np.arange(rows.size), (3 * rows + seed) % 50] += 3.0 + (rows % 5)
    out[rows % 23 == 22, EOS] += 12.0  # some positions stop
    return out


class TableBatch:
    """A BatchModel over `context_logits`: a committed canvas per sequence, passes recorded."""

    block_length = B

    def __init__(self, chunk: int = 2 * B):
        self.chunk, self.canvas, self.passes = chunk, {}, []

    def open_sequence(self, key, n_positions):
        self.canvas[key] = np.zeros(0, dtype=np.int32)

    def close_sequence(self, key):
        del self.canvas[key]

    def prefill_chunk(self, n_tokens):
        return self.chunk

    def forward(self, parts):
        self.passes.append([(p.key, p.info.kind) for p in parts])
        out = []
        for p in parts:
            canvas = self.canvas[p.key]
            assert p.start == canvas.size, "a part follows its sequence's committed tokens"
            if p.info.kind in ("prefill", "commit"):
                self.canvas[p.key] = np.concatenate([canvas, p.tokens])
                out.append(None)
            else:
                out.append(context_logits(np.concatenate([canvas, p.tokens]), p.start + p.rows))
        return out


def solo(prompt, options):
    return list(iter_decode(WindowModel(context_logits, B), prompt, options, mask_id=MASK, stop_ids=[EOS]))


def run_batch(decoder: BatchDecoder, jobs: dict, join_at: dict | None = None) -> dict:
    """Step the decoder until every job is done; jobs join at the step `join_at` names (0: first)."""
    join_at = join_at or {}
    events: dict = {key: [] for key in jobs}
    step = 0
    pending = dict(jobs)
    while pending or decoder.running:
        for key in [k for k in pending if join_at.get(k, 0) <= step]:
            if not decoder.has_room():
                break
            prompt, options = pending.pop(key)
            decoder.add(key, prompt, options, mask_id=MASK, stop_ids=[EOS])
        for key, event in decoder.step():
            events[key].append(event)
        step += 1
    return events


def same_events(got, want) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if type(g) is not type(w):
            return False
        if isinstance(g, StepEvent) and not (np.array_equal(g.canvas, w.canvas) and np.array_equal(g.committed, w.committed)):
            return False
        if isinstance(g, BlockEvent) and not np.array_equal(g.answer, w.answer):
            return False
        if isinstance(g, DecodeResult) and (g.tokens != w.tokens or g.stats.steps_per_block != w.stats.steps_per_block
                                            or g.stats.finish_reason != w.stats.finish_reason):
            return False
    return True


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 50, size=n)]


def test_every_sequence_gets_its_solo_events_whenever_it_joins():
    rng = np.random.default_rng(5)
    jobs = {}
    for i in range(7):
        options = DecodeOptions(max_new_tokens=int(rng.integers(3, 40)), block_length=B, steps=int(rng.integers(2, 9)),
                                threshold=float(rng.choice([0.5, 0.95])), temperature=float(rng.choice([0.0, 0.8])),
                                seed=i)
        jobs[f"s{i}"] = (_prompt(int(rng.integers(1, 45)), i), options)
    model = TableBatch()
    events = run_batch(BatchDecoder(model, max_batch=3), jobs, join_at={"s1": 2, "s4": 5})
    for key, (prompt, options) in jobs.items():
        assert same_events(events[key], solo(prompt, options)), key
    assert max(len(p) for p in model.passes) == 3  # never more than max_batch sequences in a pass
    assert model.canvas == {}  # every sequence's cache was released


def test_a_long_prefill_runs_a_chunk_per_pass_beside_the_others():
    model = TableBatch(chunk=B)
    decoder = BatchDecoder(model, max_batch=2)
    short = DecodeOptions(max_new_tokens=24, block_length=B, steps=B)
    decoder.add("running", _prompt(3, 1), short, mask_id=MASK, stop_ids=[])
    decoder.step()  # "running" is decoding its first block
    decoder.add("long", _prompt(5 * B + 2, 2), short, mask_id=MASK, stop_ids=[])
    for _ in range(5):
        decoder.step()
    # the long prompt's 5 full blocks went in one chunk per pass, each pass also serving "running"
    assert [p[1] for p in model.passes[1:6]] == [("long", "prefill")] * 5
    assert all(p[0][0] == "running" for p in model.passes[1:6])


def test_cancel_ends_one_sequence_and_failures_stay_with_their_sequence():
    model = TableBatch()
    decoder = BatchDecoder(model, max_batch=3)
    cancel = threading.Event()
    options = DecodeOptions(max_new_tokens=30, block_length=B, steps=B)
    decoder.add("cancelled", _prompt(4, 1), options, mask_id=MASK, stop_ids=[], cancel=cancel)
    decoder.add("bad", _prompt(4, 2), options, mask_id=MASK, stop_ids=[])
    decoder.add("fine", _prompt(4, 3), options, mask_id=MASK, stop_ids=[])
    decoder.step()
    cancel.set()
    forward = model.forward
    model.forward = lambda parts: [o if p.key != "bad" or o is None else o[:0] for p, o in zip(parts, forward(parts))]
    results = {}
    while decoder.running:
        for key, event in decoder.step():
            if isinstance(event, (DecodeResult, SequenceFailed)):
                results[key] = event
    assert results["cancelled"].stats.finish_reason == "cancelled" and results["cancelled"].tokens == []
    assert isinstance(results["bad"], SequenceFailed) and "shape" in str(results["bad"].error)
    assert results["fine"].stats.finish_reason == "length" and len(results["fine"].tokens) == 30


def test_add_checks_like_a_solo_decode():
    decoder = BatchDecoder(TableBatch(), max_batch=1)
    options = DecodeOptions(max_new_tokens=8, block_length=B)
    with pytest.raises(ValueError, match="empty"):
        decoder.add("a", [], options, mask_id=MASK, stop_ids=[])
    with pytest.raises(ValueError, match="block length"):
        decoder.add("a", [1], DecodeOptions(max_new_tokens=8, block_length=16), mask_id=MASK, stop_ids=[])
    decoder.add("a", [1], options, mask_id=MASK, stop_ids=[])
    with pytest.raises(RuntimeError, match="full"):
        decoder.add("b", [1], options, mask_id=MASK, stop_ids=[])
    with pytest.raises(ValueError, match="max_batch"):
        BatchDecoder(TableBatch(), max_batch=0)


# -- the engine -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", preset="tiny", seed=11)
    out = {}
    for typ in ("f32", "q8_0"):
        out[typ] = tmp_path_factory.mktemp("gguf") / f"tiny-{typ}.gguf"
        convert(checkpoint, out[typ], typ, progress=False)
    return out


PROMPTS = [_prompt(n, n) for n in (5, 40, 64, 1, 100)] + [_prompt(600, 9)]  # 600: a prefill of two chunks


@pytest.mark.parametrize("typ", ["f32", "q8_0"])
@pytest.mark.parametrize("device, policy", [("cpu", "tide"), ("emulated", "tide"), ("emulated", "lru"),
                                            ("emulated", "ondemand")])
def test_generate_batch_gives_every_prompt_its_solo_tokens(models, typ, device, policy):
    with tide_local.load(models[typ], device=device, policy=policy, tau=2, expert_slots=6, max_batch=4, threads=2,
                         n_ctx=1024) as eng:
        options = dict(max_new_tokens=50, threshold=0.9)
        want = [eng.generate(p, **options).tokens for p in PROMPTS]
        trace = eng.record_trace()
        got = eng.generate_batch(PROMPTS, **options)  # 6 prompts, 4 at a time: two join as others finish
        eng.stop_trace()
        assert [r.tokens for r in got] == want
        assert all(isinstance(r, GenerationResult) and r.stats.finish_reason == "length" for r in got)
        assert any(p["kind"] == "batch" and p["start"] == -1 for p in trace.passes)  # several sequences, one pass
        if device == "emulated":
            assert eng.offload.stats.passes > 0 and eng.offload.step_log == []  # no per-pass log while batching
            assert all(r.stats.offload.hits + r.stats.offload.misses > 0 for r in got)


def test_batch_sequences_keep_their_own_options_and_report_each_step(models):
    with tide_local.load(models["q8_0"], device="cpu", max_batch=3, threads=2) as eng:
        sampled = dict(max_new_tokens=40, temperature=0.9, top_k=20, seed=3)
        short = dict(max_new_tokens=7, steps=7)
        want = {"sampled": eng.generate(PROMPTS[0], **sampled).tokens, "short": eng.generate(PROMPTS[1], **short).tokens}
        got, steps = {}, []
        with eng.batch() as batch:
            batch.add("sampled", PROMPTS[0], **sampled)
            batch.add("short", PROMPTS[1], **short)
            with pytest.raises(ContextError):
                batch.add("too long", PROMPTS[2], max_new_tokens=eng.n_ctx)
            while batch.running:
                for key, event in batch.step():
                    if isinstance(event, GenerationResult):
                        got[key] = event
                steps.append(batch.last_step)
        assert {k: r.tokens for k, r in got.items()} == want
        assert got["short"].stats.forwards < got["sampled"].stats.forwards
        assert steps[0].sequences == 2 and steps[0].rows == 64 and steps[0].rows_per_expert >= 1.0
        assert steps[-1].sequences == 1  # the short one left


def test_generate_batch_refuses_a_bad_prompt_before_any_work(models):
    with tide_local.load(models["f32"], device="cpu", max_batch=2, threads=1, n_ctx=256) as eng:
        with pytest.raises(ContextError):
            eng.generate_batch([PROMPTS[0], PROMPTS[5]], max_new_tokens=8)
        assert eng.model.cache is None
        with pytest.raises(ValueError, match="max_batch"):
            with eng.batch(max_batch=3):
                pass
        with pytest.raises(ValueError, match="max_batch"):
            eng.generate_batch([PROMPTS[0]], max_batch=3, max_new_tokens=8)
        one_at_a_time = eng.generate_batch(PROMPTS[:3], max_batch=1, max_new_tokens=8)
        assert [r.tokens for r in one_at_a_time] == [eng.generate(p, max_new_tokens=8).tokens for p in PROMPTS[:3]]
    with pytest.raises(ValueError, match="max_batch"):
        tide_local.load(models["f32"], device="cpu", max_batch=0)


def test_device_plan_holds_a_kv_cache_per_sequence(models):
    with tide_local.load(models["f32"], device="cpu") as eng:
        one = plan_memory(eng.file, 1 << 40, 1024)
        four = plan_memory(eng.file, 1 << 40, 1024, sequences=4)
    assert four.device_bytes["KV cache"] == 4 * one.device_bytes["KV cache"]
    assert four.device_bytes["compute buffers"] > one.device_bytes["compute buffers"]
    with pytest.raises(BudgetError, match="4 sequences decoded together.*--max-batch"):
        with tide_local.load(models["f32"], device="emulated", gpu_memory="1MiB", max_batch=4):
            pass
