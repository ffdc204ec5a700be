"""One call that checks tide-local on a machine with an NVIDIA GPU, and reports what it found.

    benchmarks/gpu_check.sh --prepare DIR     # with network: the pinned ggml sources and the wheels into DIR
    benchmarks/gpu_check.sh DIR               # on the GPU machine, offline: build, test, measure, report
    benchmarks/gpu_check.sh --no-gpu DIR      # every part that needs no GPU (the emulated device)

`--prepare` (a machine with network to the package registries) packs the ggml sources vendored in
the pinned llama-cpp-python sdist (`scripts/build_ggml.sh sources`), the CPU and CUDA backends
only, into a small tarball, and downloads manylinux x86_64 CPython 3.12 wheels of the project's
runtime and test dependencies, at the versions installed where it runs (the tested ones), less
numpy and torch, which the GPU machine brings. DIR should be ignored by git (`/.gpucheck/` in
.git/info/exclude).

The check (Python >= 3.11 with numpy and torch; CUDA's compiler, CMake and ninja for the GPU
part) runs each stage in its own process with its own time limit, inside one budget (8 minutes
by default); a stage that fails or runs out of time is reported and the next one runs:

  wheels     the carried wheels the interpreter lacks, into a scratch site folder (pip --no-index),
             and this checkout laid out as its installed package (pyproject's package-dir)
  build      ggml with CUDA for the local GPU only (GGML_CUDA_FA=OFF), `scripts/build_ggml.sh cuda`
  model      a random mini-shaped model with few layers (q4_k_m), made on the spot
  tests      tests/test_device_backend.py (every policy on the GPU against the CPU engine) and
             tests/test_offload.py
  logits     the all-resident model on the device against the CPU engine, and TIDE's placement
             against the all-resident one on the same device
  bandwidth  host-to-device copies from pageable, pinned (the device's host buffer type) and
             mapped-file memory
  profile    `tide profile` on the device, then `tide plan` for each budget (what tau="auto" reads)
  policies   ms per step and tokens/s for resident, tide (tau 2, 4, 8 and auto), swap, lru and
             static at three budgets (1/8, 1/4 and 1/2 of the experts per layer), and cpu
  planner    the cost model's prediction of each measured run (its own routing) against the run

Without a GPU (no nvidia-smi GPU, no nvcc, or --no-gpu) the build is skipped and the other stages
run on the emulated device with a small model, so every measuring path runs; the report says
that the GPU parts did not run, and why. Results: benchmarks/results/gpu.md and gpu.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SOURCES = "ggml-src.tar.xz"  # in the prepared folder
WHEELS = "wheels"
BROUGHT = ("numpy", "torch")  # the GPU machine's own: never carried
KEPT_BACKENDS = ("ggml-cpu", "ggml-cuda")  # the only backend folders of ggml/src in the tarball
WHEEL_PLATFORM = ("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                  "--platform", "manylinux_2_17_x86_64")
CARRY_LIMIT = 60 << 20
BUDGET_S = 480
RESERVE_S = 10  # kept back from the budget for the report
TEST_FILES = ("tests/test_device_backend.py", "tests/test_offload.py")
N_CTX = 512
PROMPT_TOKENS = 48


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    import tomllib  # Python >= 3.11 (gpu_check.sh checks)

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -------------------------------------------------------------------------------------------------
# --prepare: sources and wheels to carry
# -------------------------------------------------------------------------------------------------


def ggml_sources() -> Path:
    """The pinned ggml source folder (`scripts/build_ggml.sh sources` downloads it once)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_ggml.sh"), "sources"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout.strip()
    return Path(out)


def _kept(path: Path, ggml: Path) -> bool:
    """Whether a file of the ggml folder is needed for a CPU + CUDA build."""
    rel = path.relative_to(ggml).parts
    return not (len(rel) > 2 and rel[0] == "src" and rel[1].startswith("ggml-") and rel[1] not in KEPT_BACKENDS)


def pack_sources(ggml: Path, out: Path) -> int:
    """ggml's sources without the backends we do not build, as ggml/… in an xz tarball; its size."""
    with tarfile.open(out, "w:xz") as tar:
        for path in sorted(ggml.rglob("*")):
            if path.is_file() and _kept(path, ggml):
                tar.add(path, arcname=str(Path("ggml") / path.relative_to(ggml)), recursive=False)
    return out.stat().st_size


def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def project_requirements() -> list[str]:
    """What the check needs of pyproject's requirements: the runtime ones (llama-cpp-python
    aside: its libggml is built here), and pytest and torch of the test extra."""
    data = _pyproject()["project"]
    specs = [s for s in data["dependencies"] if not _norm(s).startswith("llama-cpp-python")]
    return specs + [s for s in data["optional-dependencies"]["test"] if _norm(s).startswith(("pytest", "torch"))]


def carried_requirements() -> list[str]:
    """`project_requirements` less what the GPU machine brings, each pinned to the version
    installed in this Python where there is one (what the tests passed with)."""
    out = []
    for spec in project_requirements():
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
        if _norm(name) not in BROUGHT:
            version = _installed_version(name)
            out.append(f"{name}=={version}" if version else spec)
    return out


def _constraints(path: Path) -> Path:
    """Every package of this Python at its installed version (the dependencies' dependencies too),
    except those the GPU machine brings (their wheels are dropped: any version will do)."""
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            stdout=subprocess.PIPE, text=True).stdout.splitlines()
    pins = [line for line in frozen if re.match(r"^[A-Za-z0-9_.-]+==\S+$", line)
            and _norm(line.split("==")[0]) not in BROUGHT]
    path.write_text("".join(line + "\n" for line in pins))
    return path


def download_wheels(requirements: list[str], dest: Path) -> list[Path]:
    """manylinux x86_64 CPython 3.12 wheels of the requirements and their dependencies, less BROUGHT."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        constraints = _constraints(Path(tmp) / "constraints.txt")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", *WHEEL_PLATFORM, "-c", str(constraints),
                        "-d", str(dest), *requirements], check=True)
    for wheel in dest.glob("*.whl"):
        if _norm(wheel.name.split("-")[0]) in BROUGHT:
            wheel.unlink()
    return sorted(dest.glob("*.whl"))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def prepare(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    ggml = ggml_sources()
    log(f"prepare: packing {ggml} (the {', '.join(KEPT_BACKENDS)} backends only)")
    tarball = pack_sources(ggml, folder / SOURCES)
    requirements = carried_requirements()
    log(f"prepare: downloading wheels for {' '.join(requirements)}")
    shutil.rmtree(folder / WHEELS, ignore_errors=True)
    wheels = download_wheels(requirements, folder / WHEELS)
    total = _size(folder)
    manifest = {"pin": (ggml / ".tide-pin").read_text().strip(), "prepared": _now(), "requirements": requirements,
                "wheels": [w.name for w in wheels], "sources_bytes": tarball, "bytes": total}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"prepare: {folder}: sources {tarball / 2**20:.1f} MiB, {len(wheels)} wheels, {total / 2**20:.1f} MiB in all")
    if total > CARRY_LIMIT:
        log(f"prepare: WARNING: more than {CARRY_LIMIT >> 20} MiB to carry")
    return 0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -------------------------------------------------------------------------------------------------
# the machine
# -------------------------------------------------------------------------------------------------


def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    return found or ("/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None)


def gpus() -> list[str]:
    """The NVIDIA GPUs nvidia-smi lists (name, memory, driver, compute capability)."""
    out = _run_text(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                     "--format=csv,noheader"])
    return [line.strip() for line in out.splitlines() if line.strip()]


def no_gpu_reason(forced: bool) -> str:
    """Why the GPU parts cannot run here ("" when they can)."""
    if forced:
        return "--no-gpu was given"
    missing = []
    if not gpus():
        missing.append("nvidia-smi lists no GPU" if shutil.which("nvidia-smi") else "nvidia-smi is not installed")
    if nvcc_path() is None:
        missing.append("no CUDA compiler (nvcc)")
    return "; ".join(missing)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem = re.search(r"MemTotal:\s+(\d+) kB", _read("/proc/meminfo"))
    nvcc = nvcc_path()
    release = re.search(r"release [^\n]*", _run_text([nvcc, "--version"])) if nvcc else None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "usable_cores": _cores(),
            "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None, "gpus": gpus(),
            "nvcc": release.group(0) if release else "", "python": sys.version.split()[0],
            "cmake": _run_text(["cmake", "--version"]).split("\n")[0],
            "commit": _commit()}


def _commit() -> str:
    """HEAD, and whether the working tree differs from it (read only: no index refresh is written)."""
    head = _run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
    changed = _run_text(["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain", "-uno"]).strip()
    return f"{head} with local changes" if head and changed else head


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -------------------------------------------------------------------------------------------------
# stages: each runs in its own process (`gpu_check.py stage NAME --work W`)
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int
    what: str
    gpu: bool = False  # measures the GPU: on the emulated device without one
    needs: tuple[str, ...] = ()  # stages whose results it reads (a stage cut short may leave some)


STAGES = (
    Stage("wheels", 90, "carried wheels into a scratch site folder; this checkout as its package"),
    Stage("build", 330, "ggml with CUDA for the local GPU (GGML_CUDA_FA=OFF)"),
    Stage("model", 120, "a random model made on the spot"),
    Stage("tests", 150, "tests/test_device_backend.py and tests/test_offload.py", gpu=True),
    Stage("logits", 60, "logits on the device against the CPU engine", gpu=True, needs=("model",)),
    Stage("bandwidth", 40, "host-to-device copies: pageable, pinned, mapped file", gpu=True, needs=("model",)),
    Stage("profile", 120, "`tide profile` on the device, then `tide plan` per budget", gpu=True, needs=("model",)),
    Stage("policies", 240, "ms per step and tokens/s of every placement", gpu=True, needs=("model",)),
    Stage("planner", 40, "the cost model's predictions against the measured runs", gpu=True,
          needs=("profile", "policies")),
    Stage("batching", 90, "several prompts per forward (tide serve --max-batch) against one after another, "
          "on the CPU's cores and on the device", gpu=True, needs=("model",)),
)
BY_NAME = {s.name: s for s in STAGES}


@dataclass
class Config:
    """What every stage reads (work/config.json)."""

    carried: str
    work: str
    gpu: bool
    no_gpu_reason: str
    shape: str
    layers: int
    qtype: str
    new_tokens: int
    taus: list[int]
    threads: int
    lib_dir: str = ""

    @property
    def site(self) -> Path:
        return Path(self.work) / "site"

    @property
    def results(self) -> Path:
        return Path(self.work) / "results"

    @property
    def model(self) -> Path:
        return Path(self.work) / f"model-{self.shape}-{self.layers}l-{self.qtype}.gguf"

    def save(self) -> None:
        (Path(self.work) / "config.json").write_text(json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, work) -> Config:
        return cls(**json.loads((Path(work) / "config.json").read_text()))


def save_result(cfg: Config, name: str, data: dict) -> None:
    cfg.results.mkdir(parents=True, exist_ok=True)
    path = cfg.results / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


def load_result(cfg: Config, name: str) -> dict:
    path = cfg.results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ---- wheels ----------------------------------------------------------------------------------------


def _wheel_tags():
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        try:
            from pip._vendor.packaging.tags import sys_tags
            from pip._vendor.packaging.utils import parse_wheel_filename
        except ImportError:
            return None, None
    return set(sys_tags()), parse_wheel_filename


def sort_wheels(wheels: list[Path]) -> dict[str, list]:
    """Each carried wheel: to install, already present in this Python (its own version stays),
    or not for this interpreter."""
    supported, parse = _wheel_tags()
    out = {"install": [], "present": [], "incompatible": []}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        have = _installed_version(name)
        if have is not None:
            out["present"].append({"name": name, "carried": version, "installed": have})
        elif supported is not None and not (set(parse(wheel.name)[3]) & supported):
            out["incompatible"].append({"name": name, "carried": version, "wheel": wheel.name})
        else:
            out["install"].append({"name": name, "carried": version, "wheel": str(wheel)})
    return out


def install_wheels(paths: list[str], site: Path) -> str:
    """pip install --no-index --no-deps --target; unpacked by hand where there is no pip."""
    site.mkdir(parents=True, exist_ok=True)
    if not paths:
        return "nothing to install"
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                        *paths], check=True)
        return "pip install --no-index --no-deps --target"
    import zipfile

    for path in paths:  # a wheel is a zip of the installed files; .data/purelib and platlib belong at the top
        with zipfile.ZipFile(path) as z:
            z.extractall(site)
    for data in site.glob("*.data"):
        for sub in ("purelib", "platlib"):
            for item in (data / sub).glob("*") if (data / sub).is_dir() else ():
                shutil.move(str(item), site / item.name)
    return "unpacked (no pip)"


def link_checkout(site: Path) -> Path:
    """tide_local as `pip install .` lays it out (pyproject's package-dir: converters and tui
    inside it), as symlinks into this checkout: the check runs the working tree's code."""
    package = site / "tide_local"
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir(parents=True)
    for item in (ROOT / "tide_local").iterdir():
        if item.name != "__pycache__":
            (package / item.name).symlink_to(item)
    for name, folder in _pyproject()["tool"]["setuptools"]["package-dir"].items():
        if name.startswith("tide_local."):
            (package / name.split(".", 1)[1]).symlink_to(ROOT / folder)
    return package


_IMPORT_CHECK = r"""
import importlib, importlib.metadata as md, json, re, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
top = {}
for module, dists in md.packages_distributions().items():
    for d in dists:
        top.setdefault(re.sub(r"[-_.]+", "-", d).lower(), []).append(module)
out = {}
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        out[req.name] = {"version": None, "ok": False, "error": "not installed"}
        continue
    errors = [] if req.specifier.contains(version, prereleases=True) else [f"{version} is not {req.specifier}"]
    for module in top.get(re.sub(r"[-_.]+", "-", req.name).lower(), []):
        if module.isidentifier() and not module.startswith("_"):
            try:
                importlib.import_module(module)
            except Exception as e:
                errors.append(f"import {module}: {type(e).__name__}: {e}")
    out[req.name] = {"version": version, "ok": not errors, "error": "; ".join(errors)}
import tide_local.converters, tide_local.tui
out["tide_local"] = {"version": tide_local.__file__, "ok": True, "error": ""}
print(json.dumps(out))
"""


def stage_wheels(cfg: Config) -> dict:
    """What the interpreter lacks, from the carried wheels (offline); then every requirement imported."""
    wheels = sorted((Path(cfg.carried) / WHEELS).glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"no wheels in {Path(cfg.carried) / WHEELS}: run `benchmarks/gpu_check.sh --prepare "
                           f"{cfg.carried}` on a machine with network first")
    plan = sort_wheels(wheels)
    how = install_wheels([w["wheel"] for w in plan["install"]], cfg.site)
    link_checkout(cfg.site)
    env = dict(os.environ, PYTHONPATH=_pythonpath(cfg))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, *project_requirements()], env=env,
                          capture_output=True, text=True, cwd=cfg.work, check=False)
    if proc.returncode:
        raise RuntimeError(f"the import check failed: {proc.stderr.strip().splitlines()[-1:]}")
    imports = json.loads(proc.stdout)
    result = {"carried": len(wheels), "how": how, **plan, "imports": imports}
    save_result(cfg, "wheels", result)
    bad = [f"{k}: {v['error']}" for k, v in imports.items() if not v["ok"]]
    if bad:
        raise RuntimeError("requirements not met: " + "; ".join(bad))
    return result


def _pythonpath(cfg: Config) -> str:
    return os.pathsep.join([str(cfg.site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


# ---- build -----------------------------------------------------------------------------------------


def _unpack(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dest / "ggml"


def stage_build(cfg: Config) -> dict:
    """`scripts/build_ggml.sh cuda` (or cpu, where no libggml exists and there is no GPU) on the carried sources."""
    backend = "cuda" if cfg.gpu else "cpu"
    tarball = Path(cfg.carried) / SOURCES
    if not tarball.exists():
        raise RuntimeError(f"no {SOURCES} in {cfg.carried}: run `benchmarks/gpu_check.sh --prepare` first")
    sources = _unpack(tarball, Path(cfg.work) / "src")
    env = dict(os.environ, TIDE_GGML_SOURCES=str(sources), TIDE_GGML_BUILD_ROOT=str(Path(cfg.work) / "ggml"),
               TIDE_GGML_NO_APT="1")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_ggml.sh"), backend], env=env, stdout=subprocess.PIPE,
                          text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"scripts/build_ggml.sh {backend} failed (exit {proc.returncode}); its output is above")
    lib_dir = proc.stdout.strip().splitlines()[-1]
    info = _read(str(Path(lib_dir).parent / "build-info.txt"))
    result = {"backend": backend, "lib_dir": lib_dir, "seconds": time.perf_counter() - t0, "build_info": info}
    save_result(cfg, "build", result)
    return result


# ---- model -----------------------------------------------------------------------------------------

# The shapes: LLaDA2.0-mini's (hidden 2048, 256 experts of 512, top-8) with few layers, and a small
# one of the same proportions for machines without a GPU.
SHAPES = {
    "mini": ("mini", {}),
    "small": ("tiny", {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
                       "intermediate_size": 1024, "moe_intermediate_size": 128, "num_experts": 64,
                       "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4}),
}


def budgets(n_experts: int, n_used: int) -> list[int]:
    """Expert slots per MoE layer: 1/8, 1/4 and 1/2 of the experts (at least top-k)."""
    return sorted({max(n_used, n_experts // d) for d in (8, 4, 2)})


def stage_model(cfg: Config) -> dict:
    """A random checkpoint of the shape, converted as `tide convert` does (no hub is reachable)."""
    import io

    from tide_local.converters.convert import convert
    from tide_local.converters.testmodel import build_config, make_checkpoint

    from tide_local.modelfile import ModelFile

    preset, overrides = SHAPES[cfg.shape]
    config = build_config(preset, {**overrides, "num_hidden_layers": cfg.layers})
    t0 = time.perf_counter()
    hf = make_checkpoint(Path(cfg.work) / "hf", config, seed=0)
    t1 = time.perf_counter()
    convert(hf, cfg.model, cfg.qtype, threads=cfg.threads, progress=False, log=io.StringIO())
    t2 = time.perf_counter()
    shutil.rmtree(hf)
    with ModelFile(cfg.model) as mf:
        c = mf.config
        result = {"path": str(cfg.model), "shape": cfg.shape, "type": cfg.qtype, "layers": c.n_layers,
                  "moe_layers": len(c.moe_layers), "n_experts": c.n_experts, "n_used": c.n_experts_used,
                  "hidden": config["hidden_size"], "expert_ffn": config["moe_intermediate_size"],
                  "vocab": config["vocab_size"], "file_bytes": cfg.model.stat().st_size,
                  "expert_bytes": mf.one_expert_bytes(c.moe_layers[0]),
                  "budgets": budgets(c.n_experts, c.n_experts_used),
                  "checkpoint_seconds": t1 - t0, "convert_seconds": t2 - t1}
    save_result(cfg, "model", result)
    return result


# ---- tests -----------------------------------------------------------------------------------------


def stage_tests(cfg: Config) -> dict:
    """pytest on the device tests and the offload tests (outside the checkout, so that `tide_local`
    comes from the site folder's layout)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--rootdir", str(ROOT),
           *(str(ROOT / f) for f in TEST_FILES)]
    proc = subprocess.run(cmd, cwd=cfg.work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    sys.stderr.write(proc.stdout)
    lines = proc.stdout.strip().splitlines()
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed|error)", line)),
                   lines[-1] if lines else "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}
    skips = sorted({m.group(1).strip() for m in re.finditer(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", proc.stdout)})
    result = {"command": "pytest -q " + " ".join(TEST_FILES), "summary": summary, "counts": counts,
              "returncode": proc.returncode, "skip_reasons": skips}
    save_result(cfg, "tests", result)
    if proc.returncode:
        raise RuntimeError(f"pytest: {summary}")
    return result


# ---- shared by the device stages -------------------------------------------------------------------


def device_name(cfg: Config) -> str:
    """The first GPU of the loaded libggml, or "emulated" without a GPU."""
    from tide_local import ggml

    if not cfg.gpu:
        return "emulated"
    devs = ggml.accelerator_devices()
    if not devs:
        raise RuntimeError(f"the libggml in {ggml.lib().lib_dir} registers no GPU device")
    return devs[0].name


def prompt_ids(n: int = PROMPT_TOKENS) -> list[int]:
    import numpy as np

    return [int(i) for i in np.random.default_rng(7).integers(0, 640, size=n)]


# ---- logits ----------------------------------------------------------------------------------------


def _logits(model: Path, ids: list[int], threads: int, **load) -> tuple:
    import tide_local

    with tide_local.load(model, threads=threads, n_ctx=N_CTX, **load) as eng:
        trace = eng.record_trace()
        out = eng.logits(ids)
        eng.stop_trace()
    return out, trace.passes[0]["layers"]


def compare_logits(got, want, got_routing: dict, want_routing: dict) -> dict:
    """Per row max |got - want| over the row's largest |want| (as tests/test_device_backend.py),
    top-1 agreement, and how much of the routing (chosen on the host from the device's router
    logits) agrees; rows whose routing agrees in every layer isolate the arithmetic."""
    import numpy as np

    rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    same = np.ones(len(rel), dtype=bool)
    agree = []
    for layer, w in want_routing.items():
        rows = (np.sort(got_routing[layer], axis=1) == np.sort(w, axis=1)).all(axis=1)
        agree.append(rows.mean())
        same &= rows
    return {"rows": len(rel), "max_rel": float(rel.max()), "median_rel": float(np.median(rel)),
            "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
            "routing_agreement": float(np.mean(agree)), "rows_same_routing": int(same.sum()),
            "max_rel_same_routing": float(rel[same].max()) if same.any() else None}


def stage_logits(cfg: Config) -> dict:
    """The device's arithmetic against the CPU engine's, and offload against the all-resident run."""
    model = load_result(cfg, "model")
    device, ids = device_name(cfg), prompt_ids()
    cpu, cpu_r = _logits(cfg.model, ids, cfg.threads, device="cpu")
    resident, res_r = _logits(cfg.model, ids, cfg.threads, device=device, policy="resident",
                              expert_slots=model["n_experts"])
    slots = model["budgets"][len(model["budgets"]) // 2]
    tide, tide_r = _logits(cfg.model, ids, cfg.threads, device=device, policy="tide", tau=4, expert_slots=slots)
    result = {"device": device, "tokens": len(ids),
              "resident_vs_cpu": compare_logits(resident, cpu, res_r, cpu_r),
              "tide_vs_resident": {"slots": slots, **compare_logits(tide, resident, tide_r, res_r)}}
    save_result(cfg, "logits", result)
    return result


# ---- bandwidth -------------------------------------------------------------------------------------


def _host_array(tensor, n: int):
    """A numpy view of a host tensor's memory (e.g. in pinned memory)."""
    import ctypes

    import numpy as np

    return np.ctypeslib.as_array((ctypes.c_int8 * n).from_address(tensor.data))


def _upload_rows(backend, sources: dict, sizes: list[int]) -> list[dict]:
    """Median seconds of one `Tensor.set` of each size from each source into device memory."""
    from tide_local import ggml
    from tide_local.calibration.fitting import median_time

    ctx = ggml.Context(max_tensors=1)
    dev = ctx.new_tensor(int(ggml.GGMLType.I8), ne=(max(sizes),))
    backend.alloc_tensors(ctx)
    rows = []
    for label, src in sources.items():
        for n in (n for n in sizes if n <= len(src)):
            seconds = median_time(lambda s=src, n=n: dev.set(s[:n], offset=0), 20 if n < (8 << 20) else 7)
            rows.append({"source": label, "bytes": n, "seconds": seconds, "gb_per_s": n / seconds / 1e9})
    return rows


def _pinned(backend, like, name: str):
    """A copy of `like` in the device's pinned host memory (None, and why, where it has none)."""
    from tide_local import ggml

    buffer_type = backend.device.host_buffer_type if backend.device is not None else None
    if buffer_type is None:
        return None, f"not measured: {_where(name)} has no pinned host buffer type"
    ctx = ggml.Context(max_tensors=1)
    host = ctx.new_tensor(int(ggml.GGMLType.I8), ne=(len(like),))
    backend.alloc_tensors(ctx, buffer_type=buffer_type)
    view = _host_array(host, len(like))
    view[:] = like
    return (ctx, view), buffer_type.name  # the context owns the pinned buffer


def stage_bandwidth(cfg: Config) -> dict:
    """`Tensor.set` (ggml_backend_tensor_set, the engine's upload) into device memory, from a
    pageable numpy array, from the device's pinned host buffer type, and from the mapped model
    file (what the engine uploads experts from)."""
    import numpy as np

    from tide_local import architecture, ggml
    from tide_local.modelfile import ModelFile

    name = device_name(cfg)
    backend = ggml.Backend.cpu(1) if name == "emulated" else ggml.Backend.from_device(name)
    with ModelFile(cfg.model) as mf:
        layer = mf.config.moe_layers[0]
        sizes = sorted({mf.experts(layer, "gate").slice_bytes, 4 << 20, 64 << 20})
        pageable = ggml.aligned_empty(max(sizes), np.int8)
        pageable[:] = np.random.default_rng(0).integers(-128, 127, size=len(pageable), dtype=np.int8)
        pinned, pinned_note = _pinned(backend, pageable, name)
        sources = {"pageable": pageable, **({"pinned": pinned[1]} if pinned else {})}
        stack = mf.gguf.tensor_data(architecture.expert_tensor_name(layer, "gate")).view(np.int8)
        sources["mapped file"] = stack
        rows = _upload_rows(backend, sources, sizes)
        del sources, stack  # the file's mapping closes with mf
    result = {"device": name, "pinned": pinned_note, "expert_slice_bytes": sizes[0], "rows": rows}
    save_result(cfg, "bandwidth", result)
    return result


# ---- profile and plans -----------------------------------------------------------------------------


def _generate(eng, ids: list[int], new_tokens: int):
    """A warm-up generation (graphs built, buffers allocated), then the measured one, its routing recorded."""
    eng.generate(ids, max_new_tokens=32, steps=4, stop_ids=[])
    trace = eng.record_trace()
    res = eng.generate(ids, max_new_tokens=new_tokens, stop_ids=[])
    eng.stop_trace()
    return res, trace


def stage_profile(cfg: Config) -> dict:
    """`tide profile` and `tide plan` as their commands do, into this run's cache folder: the
    policies stage's tau="auto" then reads these plans, and the planner stage this profile."""
    import tide_local
    from tide_local.calibration.measure import measure
    from tide_local.experts.memory import budget_for_slots
    from tide_local.modelfile import ModelFile
    from tide_local.planner.lookup import cache_plan, model_identity
    from tide_local.planner.plan import make_plan
    from tide_local.planner.profile import default_profile_path
    from tide_local.planner.shape import shape_from_file

    model = load_result(cfg, "model")
    device = device_name(cfg)
    t0 = time.perf_counter()
    profile = measure(cfg.model, device, threads=cfg.threads, n_ctx=N_CTX, repeat=3, log=log)
    path = profile.save(default_profile_path(device))
    t1 = time.perf_counter()
    with tide_local.load(cfg.model, device=device, policy="resident", expert_slots=model["n_experts"], n_ctx=N_CTX,
                         threads=cfg.threads) as eng:
        _, trace = _generate(eng, prompt_ids(), cfg.new_tokens)
    plans = []
    with ModelFile(cfg.model) as mf:
        shape, identity = shape_from_file(mf), model_identity(mf)
        for slots in model["budgets"]:
            plan = make_plan(trace, shape, profile, budget_for_slots(mf, slots, N_CTX), N_CTX)
            cache_plan(plan, identity)
            preds = {k: plan.predictions[k].tokens_per_second for k in ("tide (planned)", "swap", "lru", "cpu")}
            plans.append({"slots": slots, "tau": plan.planned.tau, "planned_slots": plan.planned.slots,
                          "solve_seconds": plan.planned.solve_seconds, "predicted_tokens_per_second": preds})
    costs = profile.costs
    result = {"device": device, "path": str(path), "measure_seconds": t1 - t0, "costs": costs,
              "upload_gb_per_s": 1e-9 / costs["upload_per_byte_s"] if costs.get("upload_per_byte_s") else None,
              "fit_errors": profile.fit_errors, "plans": plans}
    save_result(cfg, "profile", result)
    return result


# ---- policies --------------------------------------------------------------------------------------


def placements(budget_list: list[int], taus: list[int], n_experts: int) -> list[dict]:
    """What the policies stage runs, in order: resident first (its routing gives static's experts)."""
    runs = [{"label": "resident", "policy": "resident", "slots": n_experts, "tau": None}]
    for b in budget_list:
        runs += [{"label": f"tide tau={t}", "policy": "tide", "slots": b, "tau": t} for t in taus]
        runs += [{"label": "tide auto", "policy": "tide", "slots": b, "tau": "auto"},
                 {"label": "swap", "policy": "swap", "slots": b, "tau": None},
                 {"label": "lru", "policy": "lru", "slots": b, "tau": None},
                 {"label": "static (popular)", "policy": "static", "slots": b, "tau": None}]
    runs.append({"label": "cpu", "policy": "cpu", "slots": 0, "tau": None})
    return runs


def _measured(res, eng) -> dict:
    """A run's figures: the engine's statistics, per step and per block, and the placement it ran
    (tau and slots as the engine resolved them: tau="auto" reads the cached plan)."""
    s = res.stats
    decode = s.seconds - s.prefill_seconds
    row = {"tokens": s.tokens, "steps": s.steps, "blocks": s.blocks, "seconds": s.seconds,
           "prefill_seconds": s.prefill_seconds, "ms_per_step": 1e3 * decode / max(1, s.steps),
           "block_seconds": decode / max(1, s.blocks), "tokens_per_second": s.tokens_per_second,
           "device_compute_seconds": s.device_compute_seconds, "host_seconds": s.host_seconds,
           "tau": eng.tau, "tau_source": eng.tau_source, "plan_slots": dict(eng.plan.slots) if eng.plan else {}}
    o = s.offload
    if o is not None:
        row.update(hit_rate=o.hit_rate, uploads_per_block=o.uploads / max(1, s.blocks), upload_seconds=o.upload_seconds,
                   cpu_expert_seconds=o.cpu_expert_seconds, wait_seconds=o.wait_seconds)
    return row


def stage_policies(cfg: Config) -> dict:
    """Every placement through the engine on the same prompt; each run's routing is kept for the planner."""
    import tide_local

    model = load_result(cfg, "model")
    device, ids = device_name(cfg), prompt_ids()
    traces = Path(cfg.work) / "traces"
    traces.mkdir(exist_ok=True)
    result = {"device": device, "new_tokens": cfg.new_tokens, "prompt_tokens": len(ids), "runs": []}
    popularity, reference = None, None
    for i, run in enumerate(placements(model["budgets"], cfg.taus, model["n_experts"])):
        log(f"policies: {run['label']}, {run['slots']} slots")
        with tide_local.load(cfg.model, device=device, policy=run["policy"], expert_slots=run["slots"],
                             tau=run["tau"] or "auto", n_ctx=N_CTX, threads=cfg.threads,
                             popularity=popularity if run["policy"] == "static" else None) as eng:
            res, trace = _generate(eng, ids, cfg.new_tokens)
            row = {**run, **_measured(res, eng)}
        if reference is None:
            reference, popularity = res.tokens, trace.popularity()
            trace.save(traces / "popularity.json")
        row["same_tokens_as_resident"] = res.tokens == reference
        row["trace"] = str(traces / f"{i:02d}.json")
        trace.save(row["trace"])
        result["runs"].append(row)
        save_result(cfg, "policies", result)  # a stage cut short keeps the runs it finished
    return result


# ---- planner against measurement -------------------------------------------------------------------


def tau_choices(plans: list[dict], runs: list[dict]) -> list[dict]:
    """Per budget, the planned tau beside the fastest measured tide run (the sweep and auto)."""
    out = []
    for plan in plans:
        sweep = [r for r in runs if r["policy"] == "tide" and r["slots"] == plan["slots"]]
        if sweep:
            best = min(sweep, key=lambda r: r["block_seconds"])
            auto = next((r for r in sweep if r["label"] == "tide auto"), None)
            out.append({"slots": plan["slots"], "planned_tau": plan["tau"], "best_measured": best["label"],
                        "best_block_s": best["block_seconds"], "auto_block_s": auto["block_seconds"] if auto else None})
    return out


def stage_planner(cfg: Config) -> dict:
    """The cost model on each run's own routing (the replay the engine's counts match) against its time."""
    import numpy as np

    from tide_local.experts.trace import RoutingTrace
    from tide_local.modelfile import ModelFile
    from tide_local.planner.cost import predict_counts, replay_counts
    from tide_local.planner.profile import load_profile
    from tide_local.planner.shape import shape_from_file

    prof, runs = load_result(cfg, "profile"), load_result(cfg, "policies").get("runs", [])
    if not runs:
        raise RuntimeError("no measured runs (the policies stage did not finish one)")
    with ModelFile(cfg.model) as mf:
        shape = shape_from_file(mf)
    costs = load_profile(prof["path"]).costs_for(shape)
    popularity = RoutingTrace.load(Path(cfg.work) / "traces" / "popularity.json").popularity()
    rows = []
    for run in runs:
        trace = RoutingTrace.load(run["trace"])
        slots = {int(k): v for k, v in run["plan_slots"].items()} or run["slots"]
        counts = replay_counts(trace, run["policy"], slots, tau=run["tau"] or 4,
                               popularity=popularity if run["policy"] == "static" else None)
        pred = predict_counts(counts, shape, costs)
        rows.append({"label": run["label"], "slots": run["slots"], "tau": run["tau"],
                     "measured_block_s": run["block_seconds"], "predicted_block_s": pred.block_seconds,
                     "measured_ms_per_step": run["ms_per_step"], "predicted_ms_per_step": 1e3 * pred.step_seconds,
                     "predicted_hit_rate": pred.hit_rate, "measured_hit_rate": run.get("hit_rate"),
                     "error": pred.block_seconds / run["block_seconds"] - 1})
    pred = np.array([r["predicted_block_s"] for r in rows])
    meas = np.array([r["measured_block_s"] for r in rows])
    rank = float(np.corrcoef(pred.argsort().argsort(), meas.argsort().argsort())[0, 1]) if len(rows) > 2 else None
    result = {"rows": rows, "mean_abs_error": float(np.mean(np.abs(pred / meas - 1))),
              "max_abs_error": float(np.max(np.abs(pred / meas - 1))), "rank_correlation": rank,
              "chosen": tau_choices(prof.get("plans", []), runs)}
    save_result(cfg, "planner", result)
    return result


# ---- batching --------------------------------------------------------------------------------------

BATCH_SIZES = (1, 2, 4, 8)


def stage_batching(cfg: Config) -> dict:
    """The same 8 prompts decoded one after another and `generate_batch`ed 2, 4 and 8 at a time:
    aggregate tokens/s and whether every answer equals its sequential one, on all the CPU's
    cores and on the device (tide at the middle budget)."""
    import tide_local
    from tide_local.bench.batching import batched_throughput

    model = load_result(cfg, "model")
    prompts = [prompt_ids(n) for n in (17, 40, 64, 90, 33, 70, 8, 50)]
    options = {"max_new_tokens": min(cfg.new_tokens, 32), "steps": 8}
    places = [("cpu", {"device": "cpu"}),
              (device_name(cfg), {"device": device_name(cfg), "policy": "tide", "tau": 4,
                                  "expert_slots": model["budgets"][len(model["budgets"]) // 2]})]
    rows = []
    for label, load in places:
        with tide_local.load(cfg.model, n_ctx=N_CTX, threads=cfg.threads, max_batch=max(BATCH_SIZES), **load) as eng:
            eng.generate(prompts[0], **options)  # warm-up
            rows += [{"on": label, **row} for row in batched_throughput(eng, prompts, BATCH_SIZES, **options)]
    result = {"threads": cfg.threads, "prompts": len(prompts), "options": options, "rows": rows}
    save_result(cfg, "batching", result)
    return result


BODIES = {"wheels": stage_wheels, "build": stage_build, "model": stage_model, "tests": stage_tests,
          "logits": stage_logits, "bandwidth": stage_bandwidth, "profile": stage_profile,
          "policies": stage_policies, "planner": stage_planner, "batching": stage_batching}


def run_stage_body(name: str, work: str) -> int:
    """`gpu_check.py stage NAME`: one stage in this process; its result JSON, or exit 1 with the error."""
    cfg = Config.load(work)
    try:
        BODIES[name](cfg)
    except Exception as err:  # noqa: BLE001 (any failure is the stage's outcome: reported, and the next one runs)
        import traceback

        traceback.print_exc()
        (cfg.results / f"{name}.error").write_text(f"{type(err).__name__}: {err}")
        return 1
    return 0


# -------------------------------------------------------------------------------------------------
# the orchestrator
# -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    status: str  # ok, failed, timed out, skipped
    on: str = ""  # where a device stage ran: the GPU or the emulated device
    seconds: float = 0.0
    limit_s: float = 0.0
    detail: str = ""


def _stream(pipe, sink, prefix: str) -> None:
    for line in pipe:
        sink.write(line)
        sys.stderr.write(f"[{prefix}] {line}")
    sys.stderr.flush()


def run_subprocess(cmd: list[str], env: dict, cwd: str, limit_s: float, log_path: Path,
                   prefix: str) -> tuple[int, bool]:
    """Run with output into `log_path` (and our stderr); kill its whole process group after
    `limit_s`. Returns (exit code, timed out)."""
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        reader = threading.Thread(target=_stream, args=(proc.stdout, sink, prefix), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=5)
    return proc.returncode, timed_out


def skip_reason(stage: Stage, cfg: Config, done: dict[str, Outcome], only: set[str] | None) -> str:
    """Why a stage does not run ("" when it runs)."""
    if only is not None and stage.name not in only:
        return "not selected (--only)"
    if stage.name == "build" and not cfg.gpu and cfg.lib_dir:
        return f"no GPU ({cfg.no_gpu_reason}): the CPU parts use the libggml in {cfg.lib_dir}"
    if stage.name not in ("wheels", "build") and not cfg.lib_dir:
        return f"no libggml to run on (the build stage {done['build'].status if 'build' in done else 'did not run'})"
    for need in stage.needs:
        if not (cfg.results / f"{need}.json").exists():
            outcome = done[need].status if need in done else "did not run"
            return f"no results of the {need} stage ({outcome})"
    return ""


def _stage_env(cfg: Config) -> dict:
    env = dict(os.environ, PYTHONPATH=_pythonpath(cfg), TIDE_CACHE_DIR=str(Path(cfg.work) / "cache"))
    if cfg.lib_dir:
        env["TIDE_GGML_LIB_DIR"] = cfg.lib_dir
    return env


def _default_lib_dir() -> str:
    """The libggml the CPU parts would load without a build ("" when there is none)."""
    if os.environ.get("TIDE_GGML_LIB_DIR"):
        return os.environ["TIDE_GGML_LIB_DIR"]
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    return str(Path(next(iter(spec.submodule_search_locations))) / "lib") if spec and spec.submodule_search_locations \
        else ""


def make_config(args, reason: str) -> Config:
    """The run's settings: a mini-shaped q4_k_m model with a GPU, a small q8_0 one without."""
    gpu = not reason
    work = Path(args.work or tempfile.mkdtemp(prefix="tide-gpucheck-"))
    shape = args.shape or ("mini" if gpu else "small")
    cfg = Config(carried=str(Path(args.folder).resolve()), work=str(work.resolve()), gpu=gpu, no_gpu_reason=reason,
                 shape=shape, layers=args.layers or (4 if shape == "mini" else 3),
                 qtype=args.type or ("q4_k_m" if shape == "mini" else "q8_0"),
                 new_tokens=args.new_tokens or 32, taus=[2, 4, 8], threads=args.threads or _cores(),
                 lib_dir="" if gpu else _default_lib_dir())
    for folder in (work / "logs", cfg.results):
        folder.mkdir(parents=True, exist_ok=True)
    cfg.save()
    return cfg


def run_one(stage: Stage, cfg: Config, limit: float, on: str) -> Outcome:
    """One stage in its own process, cut off after `limit` seconds."""
    for stale in (cfg.results / f"{stage.name}.json", cfg.results / f"{stage.name}.error"):
        stale.unlink(missing_ok=True)
    log(f"gpu_check: {stage.name} (limit {limit:.0f} s): {stage.what}")
    t0 = time.monotonic()
    cmd = [sys.executable, str(Path(__file__).resolve()), "stage", stage.name, "--work", cfg.work]
    rc, timed_out = run_subprocess(cmd, _stage_env(cfg), cfg.work, limit,
                                   Path(cfg.work) / "logs" / f"{stage.name}.log", stage.name)
    error = cfg.results / f"{stage.name}.error"
    status = "timed out" if timed_out else ("ok" if rc == 0 else "failed")
    detail = (f"after {limit:.0f} s" if timed_out else error.read_text() if error.exists() else
              f"exit {rc}" if rc else "")
    outcome = Outcome(stage.name, status, on, time.monotonic() - t0, limit, detail)
    log(f"gpu_check: {stage.name}: {status} in {outcome.seconds:.1f} s{' (' + detail + ')' if detail else ''}")
    return outcome


def run_stages(cfg: Config, deadline: float, budget_s: int, only: set[str] | None) -> dict[str, Outcome]:
    """Every stage in order, each limited to its own time and to what is left of the budget."""
    done: dict[str, Outcome] = {}
    for stage in STAGES:
        on = ("GPU" if cfg.gpu else "emulated device") if stage.gpu else ""
        why = skip_reason(stage, cfg, done, only)
        left = deadline - time.monotonic() - RESERVE_S
        if not why and left < 5:
            why = f"no time left of the {budget_s} s budget"
        if why:
            done[stage.name] = Outcome(stage.name, "skipped", on, detail=why)
            log(f"gpu_check: {stage.name}: skipped ({why})")
            continue
        done[stage.name] = run_one(stage, cfg, min(stage.limit_s, left), on)
        if stage.name == "build" and done["build"].status == "ok":
            cfg.lib_dir = load_result(cfg, "build")["lib_dir"]
            cfg.save()
    return done


def check(args) -> int:
    start = time.monotonic()
    reason = no_gpu_reason(args.no_gpu)
    cfg = make_config(args, reason)
    log(f"gpu_check: work folder {cfg.work}; " + (f"NO GPU ({reason}): the GPU parts will not run" if reason
                                                   else "GPU: " + "; ".join(gpus())))
    done = run_stages(cfg, start + args.budget_s, args.budget_s, set(args.only.split(",")) if args.only else None)
    report = assemble(cfg, done, time.monotonic() - start, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(f"gpu_check: {sum(o.status == 'ok' for o in done.values())} of {len(done)} stages ok in "
        f"{report['seconds']:.0f} s; report: {out}")
    if reason:
        log(f"gpu_check: the GPU parts did NOT run ({reason})")
    if not args.keep_work and not args.work:
        shutil.rmtree(cfg.work, ignore_errors=True)
    return 0 if all(o.status in ("ok", "skipped") for o in done.values()) else 1


def assemble(cfg: Config, done: dict[str, Outcome], seconds: float, args) -> dict:
    return {"date": _now(), "command": " ".join(["benchmarks/gpu_check.sh", *args.argv]), "gpu": cfg.gpu,
            "no_gpu_reason": cfg.no_gpu_reason, "budget_s": args.budget_s, "seconds": seconds,
            "machine": machine(), "config": {k: v for k, v in cfg.__dict__.items() if k not in ("carried", "work")},
            "manifest": json.loads(_read(str(Path(cfg.carried) / "manifest.json")) or "{}"),
            "stages": [o.__dict__ for o in done.values()],
            "results": {name: load_result(cfg, name) for name, o in done.items() if o.status != "skipped"}}


# -------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------


def _f(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]


def render(r: dict) -> str:
    """The markdown report: the machine, each stage's outcome, then each stage's figures."""
    res, m = r["results"], r["machine"]
    lines = ["# GPU check", "", f"`{r['command']}`: {r['date']}, {r['seconds']:.0f} s of a {r['budget_s']} s budget.",
             ""]
    if not r["gpu"]:
        lines += [(f"**The GPU parts did not run: {r['no_gpu_reason']}.** No figure below is a GPU's: the device "
                   "stages ran on the emulated device with a small model, to exercise the measuring code."), ""]
    build = res.get("build") or {}
    built = f" (built {build['build_info'].strip().splitlines()[-1]})" if build.get("build_info") else ""
    lines += ["## Machine", "",
              f"- CPU: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB",
              f"- GPU: {'; '.join(m['gpus']) or 'none'}",
              f"- CUDA compiler: {m['nvcc'] or 'none'}; {m['cmake'] or 'no cmake'}",
              f"- Python {m['python']}, {m['platform']}, tide-local commit {m['commit'] or 'unknown'}",
              f"- libggml: {build.get('lib_dir') or r['config'].get('lib_dir') or '-'}{built}", "",
              "## Stages", ""]
    lines += _table(["stage", "on", "status", "seconds", "limit", "detail"],
                    [[s["name"], s["on"] or "-", s["status"], f"{s['seconds']:.1f}", f"{s['limit_s']:.0f}",
                      s["detail"]] for s in r["stages"]])
    lines.append("")
    for part in (_render_wheels(res.get("wheels")), _render_model(res.get("model")), _render_tests(res.get("tests")),
                 _render_logits(res.get("logits")), _render_bandwidth(res.get("bandwidth")),
                 _render_profile(res.get("profile")), _render_policies(res.get("policies")),
                 _render_planner(res.get("planner")), _render_batching(res.get("batching"))):
        lines += part + [""] if part else []
    return "\n".join(lines).rstrip() + "\n"


def _render_wheels(w: dict) -> list[str]:
    if not w:
        return []
    versions = ", ".join(f"{k} {v['version'] if k != 'tide_local' else '(this checkout)'}"
                         for k, v in w["imports"].items())
    return ["## Dependencies", "",
            (f"{w['carried']} wheels carried: {len(w['install'])} installed ({w['how']}), {len(w['present'])} "
             f"already present in this Python, {len(w['incompatible'])} not for this interpreter."), "",
            f"Imported: {versions}."]


def _render_model(m: dict) -> list[str]:
    if not m:
        return []
    return ["## Model", "",
            (f"Random weights, {m['shape']}-shaped: {m['layers']} layers ({m['moe_layers']} MoE), hidden "
             f"{m['hidden']}, {m['n_experts']} experts of {m['expert_ffn']} (top-{m['n_used']}), vocabulary "
             f"{m['vocab']}, {m['type']}: {_mib(m['file_bytes'])}, one expert {_mib(m['expert_bytes'])}; written in "
             f"{m['checkpoint_seconds']:.1f} s, converted in {m['convert_seconds']:.1f} s. Budgets: "
             f"{', '.join(map(str, m['budgets']))} expert slots per MoE layer.")]


def _render_tests(t: dict) -> list[str]:
    if not t:
        return []
    return ["## Tests", "", f"`{t['command']}`: {t['summary']}"] + [f"- skipped: {s}" for s in t["skip_reasons"]]


def _render_logits(lg: dict) -> list[str]:
    if not lg:
        return []
    rows = []
    for label, key in (("resident on the device vs the CPU engine", "resident_vs_cpu"),
                       (f"tide ({lg['tide_vs_resident']['slots']} slots, tau 4) vs resident, same device",
                        "tide_vs_resident")):
        c = lg[key]
        rows.append([label, c["rows"], _f(c["max_rel"]), _f(c["median_rel"]), f"{c['top1_agreement']:.3f}",
                     f"{c['routing_agreement']:.3f}", c["rows_same_routing"], _f(c["max_rel_same_routing"])])
    return ["## Logits", "",
            (f"One forward of {lg['tokens']} tokens on {_where(lg['device'])} and on the CPU engine. rel: per "
             "row, max |a - b| over the row's largest |b|. Routing is chosen on the host from each run's own "
             "router logits, so a near tie can flip an expert (an O(1) change for that row); rows whose routing "
             "agrees in every layer show the arithmetic alone."), ""] + _table(
        ["comparison", "rows", "max rel", "median rel", "top-1 agreement", "routing agreement",
         "rows, same routing", "max rel there"], rows)


def _render_bandwidth(b: dict) -> list[str]:
    if not b:
        return []
    sizes = sorted({row["bytes"] for row in b["rows"]})
    rows = []
    for source in dict.fromkeys(row["source"] for row in b["rows"]):
        by = {row["bytes"]: row["gb_per_s"] for row in b["rows"] if row["source"] == source}
        rows.append([source] + [_f(by.get(n), ".2f") for n in sizes])
    return ["## Upload bandwidth", "",
            (f"`Tensor.set` (ggml_backend_tensor_set, as the engine uploads) into the memory of "
             f"{_where(b['device'])}, GB/s "
             "(median). "
             f"Pinned host memory: {b['pinned']}. The first size is one expert projection's slice of this "
             "model."), ""] + _table(["source"] + [_mib(n) for n in sizes], rows)


def _render_profile(p: dict) -> list[str]:
    if not p:
        return []
    c = p["costs"]
    rows = []
    for plan in p["plans"]:
        t = plan["predicted_tokens_per_second"]
        rows.append([plan["slots"], plan["tau"], _span(plan["planned_slots"].values()),
                     f"{plan['solve_seconds']:.2f}"]
                    + [f"{t[k]:.1f}" for k in ("tide (planned)", "swap", "lru", "cpu")])
    return ["## Profile and plans", "",
            (f"`tide profile --device {p['device']}` in {p['measure_seconds']:.0f} s: uploads "
             f"{_f(p['upload_gb_per_s'], '.2f')} GB/s + {1e6 * c['upload_per_copy_s']:.1f} us per copy; CPU experts "
             f"{1e12 * c['cpu_per_flop_s']:.3g} ps/FLOP + {1e12 * c['cpu_per_weight_byte_s']:.3g} ps/weight byte; "
             f"device experts {1e12 * c['device_per_flop_s']:.3g} ps/FLOP + "
             f"{1e12 * c['device_per_weight_byte_s']:.3g} ps/weight byte; fixed {1e6 * c['layer_s']:.0f} us per MoE "
             f"layer, LM head {1e3 * c['logits_pass_s']:.2f} ms; overlap slowdown {c['overlap_slowdown']:.2f}. "
             "Then `tide plan` for each budget, cached for tau=\"auto\" (routing: the resident run's)."), ""] + _table(
        ["slots", "planned tau", "planned slots", "solve s", "predicted tok/s: planned", "swap", "lru", "cpu"], rows)


def _render_batching(b: dict) -> list[str]:
    if not b:
        return []
    rows = [[_where(r["on"]) if r["on"] != "cpu" else f"CPU ({b['threads']} threads)", r["batch"],
             f"{r['tokens_per_second']:.1f}", f"{r['over_one_at_a_time']:.2f}", "yes" if r["same_tokens"] else "no"]
            for r in b["rows"]]
    return ["## Batching", "",
            (f"{b['prompts']} prompts, {b['options']['max_new_tokens']} new tokens in "
             f"{b['options']['steps']} steps per block: one after another (batch 1), then `generate_batch` "
             "with at most 2, 4 and 8 per forward (what `tide serve --max-batch` does). Answers equal the "
             "sequential ones on f32 and q8_0; K-quants' tiled CPU kernel rounds by row count."), ""] + _table(
        ["on", "batch", "tokens/s", "x sequential", "same answers"], rows)


def _where(device: str) -> str:
    return "the emulated device (a second ggml CPU backend: no GPU)" if device == "emulated" else f"the GPU ({device})"


def _span(values) -> str:
    """Per-layer values as one number, or their range."""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _placement(run: dict) -> str:
    """A run's label, with the plan's per-layer slots where they differ from its budget (tau="auto")."""
    planned = list(run["plan_slots"].values())
    if run["policy"] != "tide" or not planned or set(planned) == {run["slots"]}:
        return run["label"]
    return f"{run['label']} (planned slots {_span(planned)})"


def _render_policies(p: dict) -> list[str]:
    if not p:
        return []
    rows = [[r["slots"], _placement(r), "-" if r["tau"] is None else r["tau"], _f(r.get("hit_rate"), ".3f"),
             _f(r.get("uploads_per_block"), ".0f"), f"{r['ms_per_step']:.1f}", f"{r['tokens_per_second']:.1f}",
             _f(r.get("upload_seconds"), ".3f"), _f(r.get("cpu_expert_seconds"), ".3f"),
             "yes" if r["same_tokens_as_resident"] else "no"] for r in p["runs"]]
    autos = sorted({"the plan cached by the profile stage" if r["tau_source"].startswith("plan ") else r["tau_source"]
                    for r in p["runs"] if r["label"] == "tide auto"})
    return ["## Placements", "",
            (f"On {_where(p['device'])}: a {p['prompt_tokens']}-token prompt, {p['new_tokens']} new tokens (no "
             "stop), after a warm-up generation; one run each. ms/step: decoding time (block commits included, "
             "prefill not) per denoising step; tok/s: the engine's (prefill included)."), ""] + _table(
        ["slots", "placement", "tau", "hit rate", "uploads / block", "ms / step", "tok/s", "upload s",
         "CPU experts s", "same tokens as resident"], rows) + [""] + [f"tide auto used {s}." for s in autos]


def _render_planner(p: dict) -> list[str]:
    if not p:
        return []
    rows = [[r["slots"], r["label"], f"{r['predicted_block_s']:.3f}", f"{r['measured_block_s']:.3f}",
             f"{100 * r['error']:+.0f}%", f"{r['predicted_ms_per_step']:.1f}", f"{r['measured_ms_per_step']:.1f}"]
            for r in p["rows"]]
    out = ["## The planner against the measurement", "",
           ("Each run's own recorded routing replayed through its policy with the profile's costs "
            "(`tide_local.planner.cost`), against the run: seconds per decoded block. Mean |error| "
            f"{100 * p['mean_abs_error']:.0f}%, at most {100 * p['max_abs_error']:.0f}%; rank correlation of "
            f"predicted and measured block times {_f(p['rank_correlation'], '.2f')}."), ""] + _table(
        ["slots", "placement", "predicted block s", "measured block s", "error", "predicted ms/step",
         "measured ms/step"], rows)
    if p["chosen"]:
        out += [""] + _table(["slots", "planned tau", "fastest measured tide", "its block s", "tide auto block s"],
                             [[c["slots"], c["planned_tau"], c["best_measured"], f"{c['best_block_s']:.3f}",
                               _f(c["auto_block_s"], ".3f")] for c in p["chosen"]])
    return out


# -------------------------------------------------------------------------------------------------
# the command
# -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="pack the ggml sources and download the wheels into FOLDER (needs network)")
    pre.add_argument("folder")
    chk = sub.add_parser("check", help="run the check with what FOLDER carries")
    chk.add_argument("folder")
    chk.add_argument("--no-gpu", action="store_true", help="skip the GPU parts even where a GPU is present")
    chk.add_argument("--out", default=str(RESULTS / "gpu.md"), help="the report (gpu.json beside it)")
    chk.add_argument("--work", default=None, help="scratch folder (default: a temporary one, deleted after)")
    chk.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    chk.add_argument("--budget-s", type=int, default=BUDGET_S, help=f"the whole check's time (default {BUDGET_S})")
    chk.add_argument("--only", default=None, metavar="STAGES",
                     help="comma-separated stages to run: " + ",".join(s.name for s in STAGES))
    chk.add_argument("--shape", choices=sorted(SHAPES), default=None,
                     help="the model: mini (LLaDA2.0-mini's layer shape; default with a GPU) or small")
    chk.add_argument("--layers", type=int, default=None, help="layers of the model (default 4 mini, 3 small)")
    chk.add_argument("--type", default=None, help="its type (default q4_k_m mini, q8_0 small)")
    chk.add_argument("--new-tokens", type=int, default=None, help="tokens per measured run (default 32: one block)")
    chk.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    st = sub.add_parser("stage", help=argparse.SUPPRESS)
    st.add_argument("name", choices=sorted(BODIES))
    st.add_argument("--work", required=True)
    sub.add_parser("requirements", help="print the requirements --prepare downloads wheels for")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        return prepare(Path(args.folder))
    if args.command == "stage":
        return run_stage_body(args.name, args.work)
    if args.command == "requirements":
        print("\n".join(carried_requirements()))
        return 0
    if args.only:
        unknown = set(args.only.split(",")) - set(BY_NAME)
        if unknown:
            build_parser().error(f"--only: unknown stages {', '.join(sorted(unknown))}")
    args.argv = argv[1:] if argv and argv[0] == "check" else argv
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
