"""Expert offload on the emulated device: every policy is exact, and the accounting adds up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tide_local
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.experts.memory import BudgetError, budget_for_slots, parse_memory, plan_memory
from tide_local.experts.policies import LayerSlots, LRUPolicy, TidePolicy, _top_by_count
from tide_local.modelfile import ModelFile

ROOT = Path(__file__).resolve().parent.parent

N_CTX = 512
PROMPT = [int(i) for i in np.random.default_rng(3).integers(0, 640, size=40)]
GEN = dict(max_new_tokens=64, threshold=0.05)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("offload")
    ckpt = make_checkpoint(base / "hf", preset="tiny", seed=21)
    return convert(ckpt, base / "tiny-q8.gguf", "q8_0", progress=False) and base / "tiny-q8.gguf"


@pytest.fixture(scope="module")
def reference_tokens(model_path):
    with tide_local.load(model_path, device="emulated", policy="resident", expert_slots=16, n_ctx=N_CTX, threads=2) as eng:
        res = eng.generate(PROMPT, **GEN)
    with tide_local.load(model_path, device="cpu", threads=1) as eng:
        assert eng.generate(PROMPT, **GEN).tokens == res.tokens  # resident on the device == CPU only
    return res.tokens


@pytest.mark.parametrize(
    "policy, slots, tau",
    [("tide", 6, 4), ("tide", 3, 1), ("tide", 8, 3), ("swap", 6, None), ("static", 6, None),
     ("lru", 6, None), ("lru", 2, None), ("ondemand", 6, None), ("ondemand", 2, None), ("adaptive", 6, None),
     ("prefetch", 6, 4), ("cpu", 0, None)],
)
def test_every_policy_gives_the_resident_tokens(model_path, reference_tokens, policy, slots, tau):
    with tide_local.load(model_path, device="emulated", policy=policy, expert_slots=slots, tau=tau or "auto",
                         n_ctx=N_CTX, threads=2) as eng:
        res = eng.generate(PROMPT, **GEN)
        assert res.tokens == reference_tokens
        cfg = eng.config
        s = res.stats.offload
        n_moe = cfg.n_layers - cfg.n_dense_layers
        # every assignment is either a hit or a miss
        total_tokens = sum(p["tokens"] for p in s.per_step)
        assert s.hits + s.misses == total_tokens * cfg.n_experts_used * n_moe
        if policy == "cpu":
            assert s.hits == 0 and s.uploads == 0
        elif policy == "ondemand":  # Mixtral-Offload: every miss is uploaded, nothing runs on the CPU
            assert s.misses == 0 and s.uploads > 0 and s.cpu_expert_seconds == 0
        else:
            assert 0 < s.hit_rate < 1
        # slots never exceed the plan; bytes uploaded = uploads x one expert's slices
        for layer, layer_slots in eng.offload.slots.items():
            assert layer_slots.n_slots == eng.plan.slots[layer] == slots
            assert len(layer_slots.resident()) <= slots
        assert s.upload_bytes == s.uploads * eng.plan.expert_bytes
        # refreshes happen exactly where the policy says
        if policy in ("tide", "swap", "prefetch"):
            every = tau or 1
            for entry in s.per_step:
                uploads = sum(u for _, _, u in entry["layers"].values())
                if entry["step"] % every:
                    assert uploads == 0, entry
        if policy == "static":
            assert s.uploads == 0


def test_tide_refreshes_less_than_swap(model_path):
    stats = {}
    for policy, tau in (("swap", None), ("tide", 4)):
        with tide_local.load(model_path, device="emulated", policy=policy, tau=tau or "auto", expert_slots=6,
                             n_ctx=N_CTX, threads=2) as eng:
            stats[policy] = eng.generate(PROMPT, **GEN).stats
    assert stats["tide"].offload.uploads < stats["swap"].offload.uploads


def test_memory_plan(model_path):
    with ModelFile(model_path) as m:
        fixed = plan_memory(m, 1 << 40, N_CTX, max_slots=0).fixed_bytes
        plan = plan_memory(m, budget_for_slots(m, 5, N_CTX), N_CTX)
        assert set(plan.slots.values()) == {5}
        assert plan.total_bytes <= plan.budget
        assert "expert slots per MoE layer: 5 of 16" in plan.describe()
        assert plan_memory(m, 1 << 40, N_CTX).slots[1] == 16  # never more slots than experts
        with pytest.raises(BudgetError, match="smallest budget"):
            plan_memory(m, fixed - 1, N_CTX)


def test_pools_hold_at_least_k_slots_and_the_plan_counts_them(model_path):
    with ModelFile(model_path) as m:
        K, moe = m.config.n_experts_used, len(m.config.moe_layers)
        fixed = plan_memory(m, 1 << 40, N_CTX, max_slots=0).fixed_bytes
        two = plan_memory(m, 1 << 40, N_CTX, max_slots=2)  # fewer than K: the pool still has K
        assert set(two.slots.values()) == {2}
        assert two.device_bytes["expert slots"] == K * two.expert_bytes * moe
        assert budget_for_slots(m, 2, N_CTX) == budget_for_slots(m, K, N_CTX)
        short = plan_memory(m, fixed + (K - 1) * two.expert_bytes * moe, N_CTX)  # room for K-1: no pool
        assert set(short.slots.values()) == {0} and short.total_bytes <= short.budget
    with tide_local.load(model_path, device="emulated", expert_slots=2, n_ctx=N_CTX, threads=1) as eng:
        pool = eng.offload.pools[m.config.moe_layers[0]]
        assert all(t.ne[2] == K for t in pool.values())


def test_resident_needs_the_budget(model_path):
    with pytest.raises(BudgetError, match="resident"):
        tide_local.load(model_path, device="emulated", policy="resident", expert_slots=4, n_ctx=N_CTX)


@pytest.mark.parametrize("text, expected", [("6GiB", 6 * 2**30), ("6000MiB", 6000 * 2**20), ("1.5GB", 1_500_000_000),
                                            (1234, 1234), ("512", 512)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["six gigs", "6XB", "-1", -5])
def test_parse_memory_rejects(bad):
    with pytest.raises(ValueError):
        parse_memory(bad)


def test_bad_options(model_path):
    with pytest.raises(ValueError, match="policy"):
        tide_local.load(model_path, device="emulated", policy="fastest")
    with pytest.raises(tide_local.engine.DeviceError, match="no device"):
        tide_local.load(model_path, device="CUDA7")


# -- the policies on their own ---------------------------------------------------------------------------------


def test_top_by_count_prefers_residents_on_ties_and_drops_zeros():
    counts = np.array([0, 3, 3, 1, 0, 3])
    prefer = np.array([False, False, False, False, False, True])
    assert list(_top_by_count(counts, 2, prefer)) == [5, 1]
    assert list(_top_by_count(counts, 6, prefer)) == [5, 1, 2, 3]


def test_tide_evicts_least_used_and_keeps_wanted():
    slots = LayerSlots(3, 8)
    for s, e in enumerate((0, 1, 2)):
        slots.assign(s, e)
    policy = TidePolicy(tau=2)
    counts = np.array([5, 0, 1, 0, 9, 0, 0, 7])
    assert policy.refresh(slots, counts, step=1, clock=1) == []  # not a refresh step
    uploads = policy.refresh(slots, counts, step=2, clock=2)
    assert sorted(e for _, e in uploads) == [4, 7]
    assert set(slots.resident()) == {0, 4, 7}  # expert 1 (count 0) and 2 (count 1) evicted


def test_lru_uploads_misses_and_evicts_oldest():
    slots = LayerSlots(2, 8)
    policy = LRUPolicy()
    counts = np.zeros(8, dtype=int)
    counts[[1, 2]] = 1
    assert len(policy.refresh(slots, counts, 0, clock=1)) == 2
    counts[:] = 0
    counts[[2, 5]] = 1
    uploads = policy.refresh(slots, counts, 1, clock=2)
    assert uploads == [(int(slots.slot_of_expert[5]), 5)]
    assert set(slots.resident()) == {2, 5}  # 1 was least recently used


# -- the command line -------------------------------------------------------------------------------------------


def test_generate_offload_cli_stats_and_trace(model_path, tmp_path, capsys):
    from tide_local.cli import main as tide
    from tide_local.experts.trace import RoutingTrace

    trace = tmp_path / "trace.json"
    args = ["generate", "-m", str(model_path), "-p", "Hello", "-n", "40", "--raw", "--device", "emulated",
            "--policy", "tide", "--tau", "2", "--ctx", "512", "--threads", "2", "--stats", "--trace", str(trace)]
    assert tide(args + ["--gpu-memory", "26MiB"]) == 0
    err = capsys.readouterr().err
    assert "expert offload: device emulated, policy tide, tau 2" in err and "hit rate" in err
    assert "expert slots per MoE layer" in err
    t = RoutingTrace.load(trace, n_experts=16, moe_layers=[1, 2, 3])
    assert t.passes and all(p["layers"][1].shape == (p["tokens"], 4) for p in t.passes)
    # the per-layer timeline: every MoE layer of every pass, misses with their CPU run and wait
    assert {(s["pass"], s["layer"]) for s in t.timeline} == {(n, layer) for n in range(1, len(t.passes) + 1)
                                                            for layer in (1, 2, 3)}
    assert any("cpu" in s and "wait" in s and "device" in s for s in t.timeline)
    assert all(s["cpu"][0] < s["cpu"][1] <= s["wait"][1] for s in t.timeline if "cpu" in s)
    png = tmp_path / "timeline.png"
    plot = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_timeline.py"), str(trace), "-o", str(png)],
                          capture_output=True, text=True)
    assert plot.returncode == 0 and png.stat().st_size > 1000 and "cpu_beside_device" in plot.stdout, plot.stderr
    # static placement from the trace's popular experts gives the same tokens
    assert tide(args[:-2] + ["--json", "--policy", "static", "--static-from", str(trace), "--gpu-memory", "26MiB"]) == 0


def test_trace_of_another_model_is_refused(model_path, tmp_path):
    from tide_local.experts.trace import RoutingTrace, TraceError

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TraceError, match="not a valid routing trace"):
        RoutingTrace.load(bad)
    t = RoutingTrace("x", 8, 2, [1, 2])
    t.save(tmp_path / "t.json")
    with pytest.raises(TraceError, match="not this one"):
        RoutingTrace.load(tmp_path / "t.json", n_experts=16, moe_layers=[1, 2, 3])


def test_info_memory_plan(model_path, capsys):
    from tide_local.cli import main as tide

    assert tide(["info", str(model_path), "--gpu-memory", "30MiB", "--ctx", "512"]) == 0
    assert "expert slots per MoE layer: 16 of 16" in capsys.readouterr().out
    assert tide(["info", str(model_path), "--gpu-memory", "1MiB"]) == 2
    assert "smallest budget that works" in capsys.readouterr().err


@pytest.mark.parametrize("policy, slots, tau", [("tide", 5, 3), ("swap", 4, None), ("lru", 6, None),
                                                ("static", 6, None), ("ondemand", 3, None), ("adaptive", 5, None),
                                                ("prefetch", 5, 2), ("cpu", 0, None)])
def test_replaying_a_trace_reproduces_the_engine_counts(model_path, policy, slots, tau):
    from tide_local.experts.replay import replay

    with tide_local.load(model_path, device="emulated", policy=policy, expert_slots=slots, tau=tau or "auto",
                         n_ctx=N_CTX, threads=2) as eng:
        trace = eng.record_trace()
        res = eng.generate(PROMPT, **GEN)
        eng.stop_trace()
    if policy == "adaptive":  # the same prices the engine took (the fallback preset: no profile here)
        from tide_local.experts.policies import AdaptivePolicy
        from tide_local.modelfile import ModelFile
        from tide_local.planner.lookup import adaptive_prices

        with ModelFile(model_path) as mf:
            prices, source = adaptive_prices(mf, "emulated")
        assert res.stats.offload.tau_source == source
        policy = AdaptivePolicy(*prices)
    replayed = replay(trace, policy, slots, tau=tau or 4)
    assert len(replayed.passes) == len(res.stats.offload.per_step)
    for ran, rep in zip(res.stats.offload.per_step, replayed.passes):
        assert (ran["start"], ran["step"], ran["tokens"]) == (rep["start"], rep["step"], rep["tokens"])
        assert ran["layers"] == rep["layers"]
    kinds = [p["kind"] for p in replayed.passes]
    assert kinds[0] == "prefill" and "commit" in kinds and "step" in kinds


def test_deep_model_with_offload_builds_its_graphs(tmp_path):
    # every layer adds nodes to a pass (the device share is its own graph): a 20-layer
    # model must fit as well as the 4-layer test model
    ckpt = make_checkpoint(tmp_path / "hf", {"num_hidden_layers": 20}, preset="tiny", seed=2)
    path = tmp_path / "deep.gguf"
    convert(ckpt, path, "q8_0", progress=False)
    with tide_local.load(path, device="emulated", policy="tide", expert_slots=4, n_ctx=N_CTX, threads=2) as eng:
        res = eng.generate(PROMPT[:20], max_new_tokens=8)
        assert len(res.tokens) == 8 and 0 < res.stats.offload.hit_rate < 1


@pytest.mark.parametrize("kv_cache", [True, False])
def test_tide_refreshes_at_each_blocks_steps_0_tau_2tau_and_never_on_a_commit(model_path, reference_tokens, kv_cache):
    """The decoder tells the offload which block and step a pass is: with or without the KV
    cache, in every generation, TIDE (tau 3) refreshes at steps 0, 3, 6, ... of each block."""
    opts = dict(max_new_tokens=80, threshold=1.0, steps=8)  # 4 tokens a step: 8 steps per block
    with tide_local.load(model_path, device="emulated", policy="tide", tau=3, expert_slots=4, n_ctx=N_CTX,
                         threads=2) as eng:
        first, second = (eng.generate(PROMPT, kv_cache=kv_cache, **opts) for _ in range(2))
    assert first.tokens == second.tokens
    for res in (first, second):
        log = res.stats.offload.per_step
        steps = [e for e in log if e["kind"] == "step"]
        blocks = sorted({e["block"] for e in steps})
        assert blocks == list(range(len(PROMPT) // 32, len(PROMPT) // 32 + len(blocks))) and len(blocks) == 3
        assert res.stats.steps_per_block == (6, 8, 8)  # the first block holds the prompt's 8-token tail
        for block, n in zip(blocks, res.stats.steps_per_block):  # steps count from 0 in every block
            assert [e["step"] for e in steps if e["block"] == block] == list(range(n))
        refreshed = {e["step"] for e in steps if any(u for _, _, u in e["layers"].values())}
        assert 0 in refreshed and refreshed <= {0, 3, 6}
        commits = [e for e in log if e["commit"]]
        assert len(commits) == (2 if kv_cache else 0)  # no commit pass without the cache
        assert all(u == 0 for e in commits for _, _, u in e["layers"].values())
        # a commit's misses still run on the CPU
        assert all(h + m == e["tokens"] * eng.config.n_experts_used for e in commits for h, m, _ in e["layers"].values())
    # the second generation starts where the first started: its step 0 still refreshes
    first_step = next(e for e in second.stats.offload.per_step if e["kind"] == "step")
    assert first_step["step"] == 0 and any(u for _, _, u in first_step["layers"].values())


def test_adaptive_refreshes_when_the_rent_reaches_the_upload_price():
    from tide_local.experts.policies import AdaptivePolicy

    policy = AdaptivePolicy(upload_rows=10, expert_rows=0)
    slots = LayerSlots(2, 8)
    counts = np.zeros(8, dtype=np.int64)
    counts[[3, 5]] = 4  # 8 missed rows: below 2 incoming x 10
    assert policy.refresh(slots, counts, step=0, clock=1) == []
    counts[[3, 5]] = 6  # 8 + 12 = 20 rows of rent: buy both
    assert sorted(e for _, e in policy.refresh(slots, counts, step=1, clock=2)) == [3, 5]
    assert policy.refresh(slots, counts, step=2, clock=3) == []  # all hits: no rent, nothing to buy
    counts[:] = 0
    counts[7] = 9  # one new expert: 9 rows < 10, then 18 >= 10, and it evicts the least used
    assert policy.refresh(slots, counts, step=3, clock=4) == []
    assert policy.refresh(slots, counts, step=4, clock=5) == [(0, 7)]


def test_prefetch_chooses_from_the_previous_pass():
    from tide_local.experts.policies import PrefetchPolicy

    policy, slots = PrefetchPolicy(tau=1), LayerSlots(1, 8)
    first, second = np.zeros(8, dtype=np.int64), np.zeros(8, dtype=np.int64)
    first[2], second[6] = 5, 5
    assert policy.refresh(slots, first, step=0, clock=1) == [(0, 2)]  # nothing earlier: its own counts
    assert policy.refresh(slots, second, step=1, clock=2) == []  # still the previous pass's favourite
    assert policy.refresh(slots, second, step=2, clock=3) == [(0, 6)]


def test_prefetch_uploads_before_the_pass_what_the_layer_would_have():
    """The engine asks for a prefetching policy's uploads at the pass's start (they run beside the
    earlier layers); the layer's own refresh then uploads nothing, and the residency is the one a
    replay (refresh at the layer's turn) reaches."""
    from tide_local.experts.policies import PrefetchPolicy

    counts = [np.bincount(np.random.default_rng(i).integers(0, 8, 12), minlength=8) for i in range(6)]
    early, early_slots = PrefetchPolicy(tau=2), LayerSlots(3, 8)
    late, late_slots = PrefetchPolicy(tau=2), LayerSlots(3, 8)
    assert early.prefetch(early_slots, step=0, clock=1) is None  # no earlier pass yet
    for clock, c in enumerate(counts, start=1):
        ahead = early.prefetch(early_slots, step=clock - 1, clock=clock) if clock > 1 else None
        at_turn = early.refresh(early_slots, c, step=clock - 1, clock=clock)
        assert at_turn == ([] if ahead is not None else at_turn)
        assert (ahead if ahead is not None else at_turn) == late.refresh(late_slots, c, step=clock - 1, clock=clock)
        assert np.array_equal(early_slots.slot_of_expert, late_slots.slot_of_expert)


def test_uploads_are_synchronous_beside_the_emulated_device(model_path):
    with tide_local.load(model_path, device="emulated", policy="prefetch", expert_slots=6, tau=2, threads=2) as eng:
        assert not eng.offload.uploader.asynchronous  # a CPU backend: copies are memcpy, made at once
        eng.generate([1, 2, 3], max_new_tokens=8)


def test_every_placement_gives_bit_identical_logits(model_path):
    """Not just the tokens: the logits of a forward are the same bits for every placement (the
    device's outputs plus the gathered CPU rows, exact zeros where the other side owns a choice)."""
    ids = PROMPT[:37]
    with tide_local.load(model_path, device="cpu", threads=1) as eng:
        expected = eng.logits(ids)
    for policy, slots in (("resident", 16), ("tide", 3), ("ondemand", 2), ("cpu", 0), ("lru", 5)):
        with tide_local.load(model_path, device="emulated", policy=policy, expert_slots=slots, tau=2, n_ctx=N_CTX,
                             threads=2) as eng:
            for _ in range(2):  # the second forward meets a refreshed residency
                assert np.array_equal(eng.logits(ids), expected), policy
