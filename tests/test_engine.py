"""The engine against the independent torch reference: logits, greedy tokens, cache on/off, API errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from reference_llada2 import ReferenceLLaDA2, reference_generate

import tide_local
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.engine import GenerationResult
from tide_local.diffusion import BlockEvent, StepEvent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", preset="tiny", seed=11)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return ReferenceLLaDA2(checkpoint)


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    convert(checkpoint, path, "f32", progress=False)
    with tide_local.load(path, threads=1) as eng:
        yield eng


def _prompt(n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, 640, size=n)]


def test_logits_match_reference(engine, reference):
    for n in (1, 31, 32, 75):
        ids = _prompt(n, n)
        got = engine.logits(ids)
        want = reference.forward(torch.tensor(ids)).numpy()
        assert got.shape == (n, engine.config.vocab_size) and got.dtype == np.float32
        scale = np.abs(want).max()
        assert np.abs(got - want).max() < 1e-3 * scale, n


def test_cached_block_logits_equal_full_forward(engine):
    ids = _prompt(80, 3)
    full = engine.logits(ids)
    model = engine.model
    model.forward(ids[:64], 0)  # prefill two blocks
    block = model.forward(ids[64:80], 64, rows=np.arange(16))
    np.testing.assert_allclose(block, full[64:80], atol=1e-4 * np.abs(full).max(), rtol=0)


@pytest.mark.parametrize(
    "prompt_len, max_new, threshold, steps",
    [
        (10, 40, 0.95, 32),  # one token per step, prompt ends mid-block
        (32, 70, 0.03, 32),  # prompt on a block boundary; several tokens per step; n not a multiple of 32
        (45, 64, 0.05, 32),  # prompt spans a full block and a tail
        (64, 33, 0.95, 8),  # fewer steps than positions: the per-step quota
        (5, 7, 0.95, 32),  # a short generation
    ],
)
def test_greedy_tokens_match_reference(engine, reference, prompt_len, max_new, threshold, steps):
    ids = _prompt(prompt_len, prompt_len + max_new)
    want = reference_generate(reference, ids, max_new, threshold=threshold, steps=steps,
                              mask_id=engine.mask_id, eos_ids=(engine.eos_id,))
    cached = engine.generate(ids, max_new_tokens=max_new, threshold=threshold, steps=steps)
    uncached = engine.generate(ids, max_new_tokens=max_new, threshold=threshold, steps=steps, kv_cache=False)
    assert cached.tokens == want
    assert uncached.tokens == want
    assert len(cached.tokens) <= max_new
    assert cached.stats.forwarded_tokens < uncached.stats.forwarded_tokens or cached.stats.blocks == 1
    if threshold < 0.5:  # several commits per step: fewer steps than masked positions
        assert cached.stats.steps < cached.stats.blocks * 32 - prompt_len % 32


def test_stop_ids_end_the_output(engine):
    ids = _prompt(20, 9)
    free = engine.generate(ids, max_new_tokens=96, threshold=0.05)
    stop = free.tokens[40]  # a token the model does produce, in the second block
    first = free.tokens.index(stop)
    res = engine.generate(ids, max_new_tokens=96, threshold=0.05, stop_ids=[stop])
    assert res.tokens == free.tokens[: first + 1]
    assert res.stats.finish_reason == "stop"
    # decoding stopped after the block holding the stop id
    assert res.stats.blocks == (20 + first) // 32 - 20 // 32 + 1


def test_sampling_reproducible_by_seed(engine):
    ids = _prompt(12, 4)
    a = engine.generate(ids, max_new_tokens=40, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    b = engine.generate(ids, max_new_tokens=40, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    c = engine.generate(ids, max_new_tokens=40, temperature=0.8, top_k=50, top_p=0.9, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_string_prompt_and_text(engine):
    res = engine.generate("The quick brown fox", max_new_tokens=16)
    assert isinstance(res, GenerationResult) and isinstance(res.text, str)
    assert res.stats.prompt_tokens == len(engine.tokenizer.encode("The quick brown fox"))
    # ids past the tokenizer (padded vocabulary rows) are kept in tokens, skipped in text
    assert res.text == engine.tokenizer.decode(res.tokens)


def test_chat_renders_template_and_stops_at_role_end(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text = engine.tokenizer.apply_chat_template(messages)
    assert text.startswith("<role>SYSTEM</role>Be brief.") and text.endswith("<role>ASSISTANT</role>")
    assert engine.chat_stop_ids() == [engine.eos_id, engine.role_end_id]
    res = engine.chat(messages, max_new_tokens=32)
    assert res.stats.prompt_tokens == len(engine.tokenizer.encode(text))
    for stop in engine.chat_stop_ids():
        if stop in res.tokens:
            assert res.tokens.index(stop) == len(res.tokens) - 1 or engine.eos_id in res.tokens


def test_stream_events(engine):
    events = list(engine.stream(_prompt(40, 2), max_new_tokens=50, threshold=0.05))
    assert isinstance(events[-1], GenerationResult)
    steps = [e for e in events if isinstance(e, StepEvent)]
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    assert len(steps) == events[-1].stats.steps and len(blocks) == events[-1].stats.blocks


@pytest.mark.parametrize(
    "prompt, options, message",
    [
        ([], {}, "empty"),
        ("", {}, "empty"),
        ([1, 2], {"max_new_tokens": 0}, "max_new_tokens"),
        ([1, 2], {"max_new_tokens": -3}, "max_new_tokens"),
        ([1, 2], {"threshold": 0.0}, "threshold"),
        ([1, 2], {"threshold": 1.5}, "threshold"),
        ([1, 2], {"max_new_tokens": 5000}, "context"),
        ([1, 10**6], {}, "token ids"),
    ],
)
def test_bad_arguments(engine, prompt, options, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, **options)


def test_logits_context_limit(engine):
    with pytest.raises(ValueError, match="context"):
        engine.logits([1] * (engine.config.context_length + 1))


def test_one_context_limit_checked_before_work_names_the_fix(checkpoint, tmp_path):
    from tide_local.errors import ContextError

    path = tmp_path / "tiny.gguf"
    convert(checkpoint, path, "f32", progress=False)
    with tide_local.load(path, threads=1, n_ctx=64) as eng:
        assert eng.n_ctx == 64
        with pytest.raises(ContextError, match="--ctx 96") as err:
            eng.stream([1] * 40, max_new_tokens=50)  # raised at the call, before any event
        assert "n_ctx=96" in str(err.value)
        assert eng.model.cache is None  # nothing was forwarded
        with pytest.raises(ContextError, match="shorten the prompt"):
            eng.generate([1] * 40, max_new_tokens=eng.config.context_length)
        with pytest.raises(ContextError):
            eng.logits([1] * 65)
        assert len(eng.generate([1] * 10, max_new_tokens=20).tokens) <= 20  # 32 positions fit


def test_api_signatures_teach_their_parameters(engine):
    import inspect

    from tide_local.diffusion import option_specs

    load = inspect.signature(tide_local.load).parameters
    assert {"device", "gpu_memory", "policy", "tau", "threads", "n_ctx", "expert_slots"} <= set(load)
    for method in (tide_local.Engine.generate, tide_local.Engine.stream, tide_local.Engine.chat):
        params = inspect.signature(method).parameters
        assert set(option_specs()) <= set(params), method
        assert all(name in method.__doc__ for name in option_specs())
    with pytest.raises(TypeError, match="unknown generation option"):
        engine.generate([1, 2], speed=3)
    assert tide_local.GenerationResult is GenerationResult and "token ids" in GenerationResult.__doc__


def test_quantized_model_is_close(checkpoint, reference, tmp_path):
    path = tmp_path / "q8.gguf"
    convert(checkpoint, path, "q8_0", progress=False)
    with tide_local.load(path, threads=1) as eng:
        ids = _prompt(40, 1)
        got = eng.logits(ids)
        want = reference.forward(torch.tensor(ids)).numpy()
        # Quantization error moves router scores, and a flipped top-k choice changes a token's
        # output outright, so the logits drift more than the weights do (q8_0: a few %); the
        # kernels themselves are checked tightly against dequantized weights in test_ggml_ops.
        rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2))
        assert rel < 0.15
        assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.8
        assert len(eng.generate(ids, max_new_tokens=20).tokens) == 20


def test_one_engine_serves_threads_one_call_at_a_time(engine):
    """Calls from several threads take turns: each gets exactly its solo result."""
    import threading

    prompts = [_prompt(20 + 7 * i, seed=i) for i in range(4)]
    solo = [engine.generate(p, max_new_tokens=40).tokens for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = engine.generate(prompts[i], max_new_tokens=40).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == solo


def test_a_second_call_inside_an_open_stream_is_refused(engine):
    from tide_local.errors import EngineBusyError

    events = engine.stream([1, 2, 3], max_new_tokens=40)
    next(events)  # the stream holds the engine
    with pytest.raises(EngineBusyError, match="still generating"):
        engine.generate([4, 5], max_new_tokens=8)
    events.close()  # closing it frees the engine
    assert len(engine.generate([4, 5], max_new_tokens=8).tokens) <= 8


def test_a_model_file_changed_on_disk_is_refused(checkpoint, tmp_path):
    import os

    from tide_local.errors import GGUFError

    path = tmp_path / "tiny.gguf"
    convert(checkpoint, path, "f32", progress=False)
    with tide_local.load(path, threads=1) as eng:
        eng.generate([1, 2], max_new_tokens=8)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten in place, say
        with pytest.raises(GGUFError, match="changed on disk"):
            eng.generate([1, 2], max_new_tokens=8)
        with pytest.raises(GGUFError, match="changed on disk"):
            eng.logits([1, 2])


def test_default_threads_follow_the_cpu_affinity_and_the_model_size(engine):
    """A process allowed fewer cores than the machine has starts no more threads than it may run;
    a small model runs on one thread (its ops are too small to share)."""
    import subprocess
    import sys

    from tide_local.converters.testmodel import build_config
    from tide_local.architecture import LLaDA2Config
    from tide_local.engine import default_threads

    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from tide_local.ggml.backend import usable_cores; print(usable_cores())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert engine.config.hidden_size < 512 and default_threads(engine.config) == 1
    mini = LLaDA2Config.from_hf(build_config("mini"))
    assert default_threads(mini) == len(os.sched_getaffinity(0))
