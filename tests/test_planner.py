"""The planner: the program's optimum is the brute-force optimum of the same cost model, the
cost model counts what the engine counts, and bad inputs give one clear error each."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest

import tide_local
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import build_config, make_checkpoint
from tide_local.errors import ProfileError
from tide_local.experts.replay import replay
from tide_local.experts.trace import RoutingTrace
from tide_local.experts.trace_stats import step_similarity
from tide_local.architecture import LLaDA2Config
from tide_local.planner.cost import Costs, layer_times, predict, replay_counts
from tide_local.planner.milp import brute_force, build_cost_table, paper_program, solve
from tide_local.planner.profile import Profile, load_profile, preset_names
from tide_local.planner.shape import preset_shape, shape_from_config, shape_from_file
from tide_local.planner.synth import SynthSpec, calibrate, synthesize

N_CTX = 512
PROMPT = [int(i) for i in np.random.default_rng(5).integers(0, 640, size=40)]
GEN = dict(max_new_tokens=64, threshold=0.05)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own cache directory (profiles, plans, traces)."""
    monkeypatch.setenv("TIDE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("planner")
    ckpt = make_checkpoint(base / "hf", preset="tiny", seed=7)
    convert(ckpt, base / "tiny-q8.gguf", "q8_0", progress=False)
    return base / "tiny-q8.gguf"


@pytest.fixture(scope="module")
def shape(model_path):
    from tide_local.modelfile import ModelFile

    with ModelFile(model_path) as mf:
        return shape_from_file(mf)


@pytest.fixture(scope="module")
def recorded_trace(model_path, tmp_path_factory):
    with tide_local.load(model_path, device="cpu", n_ctx=N_CTX, threads=2) as eng:
        trace = eng.record_trace()
        eng.generate(PROMPT, **GEN)
        eng.stop_trace()
    path = tmp_path_factory.mktemp("trace") / "trace.json"
    trace.save(path)
    return path


def toy_costs(upload: float = 2e-4, cpu_row: float = 2e-5) -> Costs:
    """Made-up prices where uploads and CPU rows both matter."""
    return Costs(upload_per_copy_s=upload / 3, upload_per_byte_s=1e-12, copies_per_expert=3, upload_per_call_s=2e-5,
                 cpu_per_call_s=5e-5,
                 cpu_per_weight_byte_s=1e-10, cpu_per_flop_s=cpu_row / 200_000, device_per_call_s=3e-5,
                 device_per_weight_byte_s=1e-11, device_per_flop_s=1e-13, layer_s=2e-4, layer_per_token_s=1e-6,
                 layer_per_token_key_s=1e-9, logits_pass_s=1e-4)


def write_profile(path, shape, costs: Costs, device="emulated") -> Profile:
    from dataclasses import fields

    p = Profile(device=device, source="measured", model={"name": shape.name, **shape.signature()},
                costs={f.name: getattr(costs, f.name) for f in fields(Costs)})
    p.save(path)
    return p


# -------------------------------------------------------------------------------------------------
# the program
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, slots_for_memory, upload", [(0, 12, 2e-4), (1, 9, 1e-3), (2, 15, 5e-5)])
def test_milp_optimum_equals_brute_force(seed, slots_for_memory, upload):
    cfg = LLaDA2Config.from_hf(build_config("tiny"))
    shape = shape_from_config(cfg, "q8_0", name="tiny-shaped")
    spec = SynthSpec(n_experts=16, n_used=4, moe_layers=tuple(shape.moe_layers), blocks=3, steps=8, stability=0.8,
                     skew=0.6 + 0.4 * seed, seed=seed)
    trace = synthesize(spec)
    budgets, taus = [0, 2, 4, 6, 8], [1, 2, 4, 9]
    table = build_cost_table(trace, shape, toy_costs(upload), budgets=budgets, taus=taus,
                             capacity=slots_for_memory * shape.expert_bytes)
    for (per_layer_tau, uniform), branch in itertools.product(((False, False), (True, False), (False, True)),
                                                              (True, False)):
        # branch: the shared tau (budget) fixed in turn; else CBC gets the whole linked program
        sol = solve(table, per_layer_tau=per_layer_tau, uniform=uniform, branch_shared=branch)
        best = brute_force(table, per_layer_tau=per_layer_tau, uniform=uniform)
        assert sol.seconds_per_block == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert sum(sol.slots.values()) <= slots_for_memory
        if not per_layer_tau:
            assert len(set(sol.taus.values())) == 1 and sol.tau in taus
        if uniform:
            assert len(set(sol.slots.values())) == 1
    # the paper's program: the most uniform slots that fit, tau alone
    uniform_slots = max(b for b in budgets if b * len(shape.moe_layers) <= slots_for_memory)
    paper = paper_program(table, uniform_slots)
    assert paper.seconds_per_block == pytest.approx(min(table.cost({l: uniform_slots for l in table.layers}, t)
                                                        for t in taus))
    # more freedom never costs more
    assert solve(table).seconds_per_block <= paper.seconds_per_block + 1e-12
    assert solve(table, per_layer_tau=True).seconds_per_block <= solve(table).seconds_per_block + 1e-12


def test_table_costs_are_the_replayed_cost_model():
    """A table entry is the cost model's prediction for that placement, layer by layer."""
    cfg = LLaDA2Config.from_hf(build_config("tiny"))
    shape = shape_from_config(cfg, "q8_0")
    trace = synthesize(SynthSpec(n_experts=16, n_used=4, moe_layers=tuple(shape.moe_layers), blocks=2, steps=6,
                                 stability=0.7, skew=1.0))
    costs = toy_costs()
    table = build_cost_table(trace, shape, costs, budgets=[3, 5], taus=[2, 3], capacity=1 << 40)
    pred = predict(trace, shape, costs, "tide", {1: 3, 2: 5, 3: 3}, tau=3)
    assert table.cost({1: 3, 2: 5, 3: 3}, 3) == pytest.approx(pred.block_seconds, rel=1e-12)


def test_layer_time_is_uploads_then_the_slower_side_then_fixed_work():
    cfg = LLaDA2Config.from_hf(build_config("tiny"))
    shape = shape_from_config(cfg, "q8_0")
    trace = synthesize(SynthSpec(n_experts=16, n_used=4, moe_layers=tuple(shape.moe_layers), blocks=1, steps=4))
    costs = toy_costs()
    counts = replay_counts(trace, "tide", 4, tau=2)
    t = layer_times(counts, shape, costs)
    i, j = 3, 1  # a denoising step, layer 2
    T, m = counts.tokens[i], counts.misses[i, j]
    up = counts.uploads[i, j] * (3 * costs.upload_per_copy_s + costs.upload_per_byte_s * shape.expert_bytes) + \
        (costs.upload_per_call_s if counts.uploads[i, j] else 0.0)
    rows = -(-m // 8) * 8  # padded to a multiple of 8
    cpu = (costs.cpu_per_call_s + costs.cpu_per_weight_byte_s * counts.cpu_experts[i, j] * shape.expert_bytes
           + costs.cpu_per_flop_s * rows * shape.expert_flops_per_row) if m else 0.0
    dev = costs.device_per_call_s + costs.device_per_weight_byte_s * counts.device_experts[i, j] * shape.expert_bytes \
        + costs.device_per_flop_s * T * shape.n_experts_used * shape.expert_flops_per_row
    # the layer's input down, the missed rows and their index up
    copies = (2 * costs.upload_per_copy_s + costs.upload_per_byte_s * 4 * (T * shape.hidden_size
              + m * shape.hidden_size + T * shape.n_experts_used)) if m else 0.0
    fixed = costs.layer_s + costs.layer_per_token_s * T + costs.layer_per_token_key_s * T * (counts.start[i] + T)
    assert t.total[i, j] == pytest.approx(up + copies + max(cpu, dev) + fixed)


# -------------------------------------------------------------------------------------------------
# the cost model counts what the engine counts
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, slots, tau", [("tide", 5, 3), ("swap", 4, None), ("static", 6, None),
                                                ("lru", 6, None), ("ondemand", 3, None), ("cpu", 0, None)])
def test_replayed_counts_are_the_engine_statistics(model_path, policy, slots, tau):
    with tide_local.load(model_path, device="emulated", policy=policy, expert_slots=slots, tau=tau or "auto",
                         n_ctx=N_CTX, threads=2) as eng:
        trace = eng.record_trace()
        stats = eng.generate(PROMPT, **GEN).stats
        eng.stop_trace()
        tau = eng.tau or 1
    counts = replay_counts(trace, policy, slots, tau=tau)
    assert counts.as_replay() == [{**p, "kind": p["kind"]} for p in replay(trace, policy, slots, tau=tau).passes]
    engine = [(p["start"], p["step"], p["tokens"], p["layers"]) for p in stats.offload.per_step]
    assert engine == [(p["start"], p["step"], p["tokens"], p["layers"]) for p in counts.as_replay()]
    assert stats.offload.hits == counts.hits.sum() and stats.offload.misses == counts.misses.sum()
    assert stats.offload.misses == counts.misses.sum() and stats.offload.uploads == counts.uploads.sum()


def test_planned_per_layer_slots_run_in_the_engine_and_are_counted_exactly(model_path, recorded_trace, shape,
                                                                         cache_dir, tmp_path):
    """`tide plan` caches a plan; the engine's tau="auto" runs it (per-layer slots and tau), and
    the cost model's counts for that placement equal the engine's statistics."""
    from tide_local.cli import main as tide
    from tide_local.planner.lookup import plan_dir
    from tide_local.planner.profile import default_profile_path

    # uploads priced high and CPU rows cheap in one layer's worth: the program leaves the budget uneven
    write_profile(default_profile_path("emulated"), shape, toy_costs(upload=3e-4))
    assert tide(["plan", "-m", str(model_path), "--expert-slots", "6", "--ctx", str(N_CTX), "--device", "emulated",
                 "--trace", str(recorded_trace), "--json"]) == 0
    cached = list(plan_dir().glob("*.json"))
    assert len(cached) == 1
    plan = json.loads(cached[0].read_text())
    slots = {int(k): v for k, v in plan["slots"].items()}
    with tide_local.load(model_path, device="emulated", policy="tide", expert_slots=6, n_ctx=N_CTX, threads=2) as eng:
        assert eng.tau == plan["tau"] and eng.plan.slots == slots
        assert eng.tau_source.startswith("plan ")
        trace = eng.record_trace()
        stats = eng.generate(PROMPT, **GEN).stats
        eng.stop_trace()
        assert stats.offload.tau_source.startswith("plan ")
        for layer, n in slots.items():
            assert eng.offload.slots[layer].n_slots == n
    counts = replay_counts(trace, "tide", slots, tau=plan["tau"])
    assert [p["layers"] for p in stats.offload.per_step] == [p["layers"] for p in counts.as_replay()]
    assert (stats.offload.hits, stats.offload.misses, stats.offload.uploads) == \
        (counts.hits.sum(), counts.misses.sum(), counts.uploads.sum())


def test_engine_without_a_plan_uses_the_default_and_says_why(model_path, shape):
    from tide_local.planner.profile import default_profile_path

    with tide_local.load(model_path, device="emulated", policy="tide", expert_slots=4, n_ctx=N_CTX, threads=2) as eng:
        assert eng.tau == 4 and "no profile for device 'emulated'" in eng.tau_source
        assert eng.generate(PROMPT, max_new_tokens=8, threshold=0.05).stats.offload.tau_source == eng.tau_source
    write_profile(default_profile_path("emulated"), shape, toy_costs())
    with tide_local.load(model_path, device="emulated", policy="tide", expert_slots=4, n_ctx=N_CTX, threads=2) as eng:
        assert eng.tau == 4 and "no cached plan" in eng.tau_source and "tide plan" in eng.tau_source
    default_profile_path("emulated").write_text("{not json")
    with tide_local.load(model_path, device="emulated", policy="tide", expert_slots=4, n_ctx=N_CTX, threads=2) as eng:
        assert eng.tau == 4 and "unusable" in eng.tau_source
    with tide_local.load(model_path, device="emulated", policy="tide", tau=2, expert_slots=4, n_ctx=N_CTX,
                         threads=2) as eng:
        assert eng.tau == 2 and eng.tau_source == "given"


# -------------------------------------------------------------------------------------------------
# profiles
# -------------------------------------------------------------------------------------------------


def test_profile_measures_this_machine(model_path, shape, tmp_path, capsys):
    from tide_local.cli import main as tide

    out = tmp_path / "p.json"
    assert tide(["profile", "-m", str(model_path), "--device", "emulated", "--repeat", "1", "--threads", "2",
                 "-o", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    profile = load_profile(out)
    assert printed["source"] == profile.source == "measured" and profile.device == "emulated"
    costs = profile.costs_for(shape)
    assert costs.upload_per_byte_s > 0 and costs.logits_pass_s >= 0
    # something costs time on each side
    assert costs.cpu_seconds(64, 8, shape) > 0 and costs.device_seconds(128, 8, shape) > 0
    assert set(profile.samples) == {"upload", "cpu_experts", "device_experts", "overlap", "fixed"}
    assert costs.overlap_slowdown >= 1


def test_presets_are_labelled_estimates_and_price_any_model():
    assert {"a100-40gb-pcie4", "h100-80gb-pcie5"} <= set(preset_names())
    mini, flash = preset_shape("mini"), preset_shape("flash")
    for name in ("a100-40gb-pcie4", "h100-80gb-pcie5"):
        p = load_profile(name)
        assert p.source == "specification" and "ESTIMATES" in p.description
        for s in (mini, flash):
            c = p.costs_for(s)
            # one bf16 mini expert over PCIe: about 6.3 MB at tens of GB/s
            assert 1e-4 < c.upload_seconds(1, s.expert_bytes) < 2e-3 * (s.expert_bytes / mini.expert_bytes)
    # the paper's budgets: 128 / 64 mini experts per layer in ~18 / ~10 GB, 64 / 32 flash in ~55 / ~30 GB
    gb = lambda s, b: (s.fixed_device_bytes(4096) + b * s.expert_bytes * s.n_moe_layers) / 1e9  # noqa: E731
    assert 15 < gb(mini, 128) < 19 and 8 < gb(mini, 64) < 11
    assert 50 < gb(flash, 64) < 58 and 27 < gb(flash, 32) < 33


@pytest.mark.parametrize("content, why", [
    ("{not json", "cannot read it as JSON"),
    ('{"format": "something else", "version": 1}', "format"),
    ('{"format": "tide-local profile", "version": 99, "source": "measured"}', "version 99"),
    ('{"format": "tide-local profile", "version": 1, "source": "measured", "device": "x", "costs": {"layer_s": 1}}',
     "lacks"),
    ('{"format": "tide-local profile", "version": 1, "source": "specification", "device": "x"}', "missing"),
])
def test_bad_profiles_are_refused_with_one_error(tmp_path, content, why):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=why):
        load_profile(path)


# -------------------------------------------------------------------------------------------------
# `tide plan`: output and one-line errors
# -------------------------------------------------------------------------------------------------


def _plan(args, capsys):
    from tide_local.cli import main as tide

    code = tide(["plan"] + args)
    return code, capsys.readouterr()


def test_plan_prints_the_choice_and_the_baselines(model_path, recorded_trace, tmp_path, capsys):
    code, out = _plan(["-m", str(model_path), "--expert-slots", "6", "--ctx", str(N_CTX), "--profile",
                       "a100-40gb-pcie4", "--trace", str(recorded_trace), "--per-layer-tau"], capsys)
    assert code == 0, out.err
    text = out.out
    assert "chosen: tau" in text and "ESTIMATE" in text
    for label in ("tide (planned)", "tide (uniform, paper)", "prefetch (planned)", "adaptive", "swap",
                  "static (oracle)", "lru", "ondemand", "cpu"):
        assert label in text
    assert "static (held-out)" not in text
    # a popularity trace for the static baseline: with the planned trace itself it is the oracle again
    code, out = _plan(["-m", str(model_path), "--expert-slots", "6", "--ctx", str(N_CTX), "--profile",
                       "a100-40gb-pcie4", "--trace", str(recorded_trace), "--popularity", str(recorded_trace),
                       "--json", "--no-cache"], capsys)
    predictions = json.loads(out.out)["predictions"]
    assert predictions["static (held-out)"] == predictions["static (oracle)"]
    assert predictions["ondemand"]["hit_rate"] == 1.0
    code, out = _plan(["-m", str(model_path), "--expert-slots", "6", "--ctx", str(N_CTX), "--profile",
                       "a100-40gb-pcie4", "--trace", str(recorded_trace), "--json", "--taus", "1,2,4"], capsys)
    data = json.loads(out.out)
    assert data["tau"] in (1, 2, 4) and data["grid"]["taus"] == [1, 2, 4]
    assert data["programs"]["planned"]["seconds_per_block"] <= data["programs"]["paper"]["seconds_per_block"] + 1e-12
    assert sum(data["slots"].values()) * data["expert_bytes"] <= data["budget"] - data["fixed_bytes"]


def test_plan_records_a_trace_when_none_is_given(model_path, cache_dir, capsys):
    code, out = _plan(["-m", str(model_path), "--expert-slots", "4", "--ctx", str(N_CTX), "--profile",
                       "h100-80gb-pcie5", "--taus", "1,4", "--threads", "2"], capsys)
    assert code == 0, out.err
    assert "recording the routing" in out.err
    assert len(list((cache_dir / "traces").glob("*.json"))) == 1
    code, out = _plan(["-m", str(model_path), "--expert-slots", "4", "--ctx", str(N_CTX), "--profile",
                       "h100-80gb-pcie5", "--taus", "1,4"], capsys)
    assert code == 0 and "recorded earlier" in out.err


def _one_line_error(code, out, *needles):
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tide plan: error:"), out.err
    for n in needles:
        assert n in lines[0]


def test_plan_errors_are_one_line(model_path, recorded_trace, shape, tmp_path, capsys):
    base = ["-m", str(model_path), "--ctx", str(N_CTX), "--trace", str(recorded_trace)]
    # a corrupt profile
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    _one_line_error(*_plan(base + ["--expert-slots", "4", "--profile", str(bad)], capsys), "not a usable")
    # a profile of another model
    other = replace(shape, expert_bytes=shape.expert_bytes * 2, name="another model")
    write_profile(tmp_path / "other.json", other, toy_costs())
    _one_line_error(*_plan(base + ["--expert-slots", "4", "--profile", str(tmp_path / "other.json")], capsys),
                    "measured on another model", "tide profile")
    # a trace of another model
    t = RoutingTrace.load(recorded_trace)
    t.n_experts = 32
    t.save(tmp_path / "other-trace.json")
    _one_line_error(*_plan(["-m", str(model_path), "--expert-slots", "4", "--profile", "a100-40gb-pcie4",
                            "--trace", str(tmp_path / "other-trace.json")], capsys), "not this one")
    # a corrupt trace
    (tmp_path / "broken.json").write_text('{"version": 1')
    _one_line_error(*_plan(["-m", str(model_path), "--expert-slots", "4", "--profile", "a100-40gb-pcie4",
                            "--trace", str(tmp_path / "broken.json")], capsys), "not a valid routing trace")
    # budgets that fit nothing
    _one_line_error(*_plan(base + ["--gpu-memory", "1MiB", "--profile", "a100-40gb-pcie4"], capsys),
                    "smallest budget that works")
    fixed = shape.fixed_device_bytes(N_CTX)
    _one_line_error(*_plan(base + ["--gpu-memory", str(fixed + shape.expert_bytes), "--profile", "a100-40gb-pcie4"],
                           capsys), "no room for an expert slot")
    # usage
    _one_line_error(*_plan(["-m", str(model_path), "--profile", "a100-40gb-pcie4"], capsys), "--gpu-memory")
    _one_line_error(*_plan(base + ["--gpu-memory", "lots", "--profile", "a100-40gb-pcie4"], capsys), "memory size")
    _one_line_error(*_plan(base + ["--expert-slots", "4", "--profile", "no-such-preset"], capsys), "no such profile")


def test_profile_error_is_one_line(tmp_path, capsys):
    from tide_local.cli import main as tide

    assert tide(["profile", "-m", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tide profile: error:")


# -------------------------------------------------------------------------------------------------
# synthetic traces
# -------------------------------------------------------------------------------------------------


def test_synthetic_traces_hit_the_calibration_targets():
    spec = SynthSpec(n_experts=64, n_used=4, moe_layers=(1, 2), blocks=3, steps=10)
    tuned = calibrate(spec, similarity=0.95, hit_rate=0.9, sample_layers=2)
    trace = synthesize(replace(tuned, blocks=6, seed=3))
    assert step_similarity(trace, 1) == pytest.approx(0.95, abs=0.02)
    assert step_similarity(trace, 5) < step_similarity(trace, 1)
    # routing is a valid trace: save, load, replay
    assert all(p["layers"][1].shape == (p["tokens"], 4) for p in trace.passes)
    assert replay(trace, "tide", 8, tau=2).totals()["blocks"] == 6
