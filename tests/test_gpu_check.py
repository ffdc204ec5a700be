"""benchmarks/gpu_check.py, the one-call check of a machine with an NVIDIA GPU: what it carries,
how its stages are chosen, and its path without a GPU end to end on a small model (the stages
that need no prepared folder), so that the check cannot rot between runs on a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_carried_requirements_leave_out_the_built_and_the_brought(gpu_check):
    reqs = gpu_check.carried_requirements()
    names = {gpu_check._norm(r.split("=")[0].split(">")[0]) for r in reqs}
    assert {"gguf", "pulp", "pytest"} <= names
    assert not names & {"llama-cpp-python", "numpy", "torch"}
    assert all("==" in r or ">=" in r for r in reqs)


def test_the_sources_keep_only_the_cpu_and_cuda_backends(gpu_check, tmp_path):
    ggml = tmp_path / "ggml"
    files = ["CMakeLists.txt", "include/ggml-vulkan.h", "src/ggml.c", "src/ggml-cpu/ops.cpp",
             "src/ggml-cuda/mmq.cu", "src/ggml-vulkan/ggml-vulkan.cpp", "src/ggml-metal/x.m"]
    for f in files:
        (ggml / f).parent.mkdir(parents=True, exist_ok=True)
        (ggml / f).write_text("x")
    gpu_check.pack_sources(ggml, tmp_path / "src.tar.xz")
    import tarfile

    with tarfile.open(tmp_path / "src.tar.xz") as tar:
        names = sorted(tar.getnames())
    assert names == sorted(f"ggml/{f}" for f in files[:5])


def test_without_a_gpu_the_build_is_skipped_and_device_stages_need_a_libggml(gpu_check, tmp_path):
    cfg = gpu_check.Config(carried=str(tmp_path), work=str(tmp_path), gpu=False, no_gpu_reason="no nvcc",
                           shape="small", layers=2, qtype="q8_0", new_tokens=32, taus=[2], threads=1,
                           lib_dir="/some/lib")
    build, logits = gpu_check.BY_NAME["build"], gpu_check.BY_NAME["logits"]
    assert "no GPU (no nvcc)" in gpu_check.skip_reason(build, cfg, {}, None)
    failed = {"model": gpu_check.Outcome("model", "failed")}
    assert "no results of the model stage (failed)" in gpu_check.skip_reason(logits, cfg, failed, None)
    gpu_check.save_result(cfg, "model", {})
    assert gpu_check.skip_reason(logits, cfg, failed, None) == ""
    cfg.gpu, cfg.lib_dir = True, ""
    assert gpu_check.skip_reason(build, cfg, {}, None) == ""
    assert "no libggml" in gpu_check.skip_reason(logits, cfg, {"build": gpu_check.Outcome("build", "timed out")}, None)
    runs = gpu_check.placements([8, 16], [2, 4], 64)
    assert runs[0]["label"] == "resident" and runs[-1]["label"] == "cpu" and len(runs) == 2 + 2 * 6


def test_the_check_without_a_gpu_writes_a_report_that_says_so(gpu_check, tmp_path):
    out = tmp_path / "gpu.md"
    rc = gpu_check.main(["check", "--no-gpu", "--work", str(tmp_path / "work"), "--out", str(out), "--only",
                         "model,bandwidth,batching", "--shape", "small", "--layers", "2", "--threads", "1",
                         "--new-tokens", "8",
                         str(tmp_path / "carried")])
    assert rc == 0
    text = out.read_text()
    assert "**The GPU parts did not run: --no-gpu was given.**" in text
    assert "| build | - | skipped |" in text and "| bandwidth | emulated device | ok |" in text
    assert "## Upload bandwidth" in text and "| pageable |" in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["gpu"] is False and report["results"]["model"]["moe_layers"] == 1
    assert report["results"]["bandwidth"]["pinned"].startswith("not measured")
    assert "## Batching" in text  # several prompts per forward, each answer its sequential one (q8_0)
    assert [r["batch"] for r in report["results"]["batching"]["rows"]] == [1, 2, 4, 8] * 2
    assert all(r["same_tokens"] for r in report["results"]["batching"]["rows"])
