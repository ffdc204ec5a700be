"""Fuzzing: mutated GGUF headers and tensor tables, mutated config.json values and safetensors
headers, and random command lines for `tide info`, `tide generate` and `tide convert` end in
success or in one of our errors (a TideError: one line, exit code 2), never in another
exception, a hang, or unbounded memory.

Every case is deterministic in its seed. The cases run in a subprocess (this file, run as a
script) with its address space limited to 2 GiB and a timer per case; each case's outcome
comes back as a JSON line, so a crash names the case it happened in.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path

MEM_LIMIT = 2 << 30
CASE_SECONDS = 20
# TIDE_FUZZ_SCALE=10 runs ten times the cases (new seeds after the usual ones), for a longer hunt
SCALE = max(1, int(os.environ.get("TIDE_FUZZ_SCALE", "1")))
GROUP_TIMEOUT = 300 * SCALE

_U64 = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 65535, 65536, 1 << 24, (1 << 31) - 1,
        1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
_HOSTILE = [None, True, False, 0, -1, 1, 2, 3, 7, 33, 1 << 31, 1 << 63, -(1 << 63), 1 << 64, 10 ** 30, 0.5, -0.0,
            1e-300, 1e308, float("inf"), float("-inf"), float("nan"), "", "x", "bfloat16", "1", [], [1], [[]],
            {}, {"type": "yarn", "factor": 4.0}, "a" * 5000]
_TEXT = ["hello", "", " ", "\n", "-", "--", "-n", "é", "\udcff", "\ud800x", "\x00", "💥" * 50, "a" * 3000,
         "{{ raise_exception('x') }}", "<|mask|>" * 20, "<|role_end|>"]


# -- the mutations (run in the subprocess, deterministic in the seed) ------------------------------

_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-30, 1e30, 3.4e38, 0.5]


def _field_patch(rng: random.Random, base: bytes, field: list) -> tuple[int, bytes]:
    """A new value for one field of the header (a value, a type, a count, a dimension ...)."""
    what, at, size, kind = field
    fmt = {("f", 4): "<f", ("f", 8): "<d", ("i", 1): "<b", ("i", 2): "<h", ("i", 4): "<i", ("i", 8): "<q",
           ("u", 1): "<B", ("u", 2): "<H", ("u", 4): "<I", ("u", 8): "<Q", ("b", 1): "<B"}[kind, size]
    if kind == "f":
        return at, struct.pack(fmt, rng.choice(_FLOATS))
    old = struct.unpack(fmt, base[at:at + size])[0]
    bits = 8 * size
    choices = [old + 1, old - 1, old * 2, old // 2, 0, 1, 2, 3, rng.randrange(0, 40)] + rng.sample(_U64, 6)
    value = rng.choice(choices)
    value %= 1 << bits
    if kind == "i" and value >= 1 << (bits - 1):
        value -= 1 << bits
    return at, struct.pack(fmt, value)


def gguf_patches(base: bytes, seed: int, table: tuple[int, int], fields: list):
    """(op, [(offset, bytes)], truncate_at or None) for one mutation of a GGUF file."""
    rng = random.Random(seed)
    op = rng.choice(["flip", "word", "table-flip", "table-word", "truncate", "field", "field", "field"])
    if op == "field":
        return op, [_field_patch(rng, base, rng.choice(fields)) for _ in range(rng.choice([1, 1, 1, 2, 3]))], None
    head_end = min(8192, len(base))
    lo, hi = (0, head_end) if op in ("flip", "word") else table
    if op == "truncate":
        where = rng.choice([(0, 64), (0, head_end), table, (table[1], len(base))])
        return op, [], rng.randrange(*where)
    patches = []
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(lo, hi)
        if op.endswith("flip"):
            patches.append((at, bytes([base[at] ^ rng.randint(1, 255)])))
        else:
            fmt = rng.choice(["<Q", "<I"])
            value = rng.choice(_U64) % (1 << (64 if fmt == "<Q" else 32))
            patches.append((at, struct.pack(fmt, value)[: hi - at]))
    return op, patches, None


def config_text(base: dict, seed: int) -> str:
    rng = random.Random(seed)
    cfg = dict(base)
    op = rng.choice(["set", "set", "set", "delete", "scale", "corrupt"])
    keys = sorted(cfg) + ["expert_capacity", "num_nextn_predict_layers", "rope_scaling"]
    if op == "set":
        for key in rng.sample(keys, rng.randint(1, 3)):
            cfg[key] = rng.choice(_HOSTILE)
    elif op == "delete":
        for key in rng.sample(sorted(cfg), rng.randint(1, 3)):
            del cfg[key]
    elif op == "scale":
        ints = [k for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool)]
        for key in rng.sample(ints, rng.randint(1, 2)):
            cfg[key] = rng.choice([cfg[key] - 1, cfg[key] + 1, cfg[key] * 2, cfg[key] // 2, cfg[key] * 1000, -cfg[key]])
    text = json.dumps(cfg)
    if op == "corrupt":
        at = rng.randrange(len(text))
        text = rng.choice([text[:at], text[:at] + rng.choice(["\x00", "}", "{", "\"", "\\u12", "é"]) + text[at:]])
    return text


def safetensors_bytes(raw: bytes, seed: int) -> bytes:
    """A mutation of one shard: its header's entries, its header length, or its size."""
    rng = random.Random(seed)
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    op = rng.choice(["dtype", "shape", "offsets", "offsets", "entries", "length", "flip", "truncate"])
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    if op == "dtype":
        header[name]["dtype"] = rng.choice(["BF16", "F16", "F32", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", 5, None])
    elif op == "shape":
        shape = list(header[name]["shape"])
        header[name]["shape"] = rng.choice([[], [0], [-1, 4], shape[::-1], shape + [1], [1 << 62, 1 << 62],
                                            [1 << 40] + shape[1:], [shape[0] * 2] + shape[1:], [1.5, 2], ["a"],
                                            None, "x", [True, 2]])
    elif op == "offsets":
        a, b = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[b, a], [a, a], [a, b + 1], [a - 1, b], [0, b - a], [a, 1 << 64],
                                                   [-8, b], [a, len(data) + 4096], [a], [a, b, 3], [str(a), b],
                                                   [float(a), b], None, {}])
    elif op == "entries":
        choice = rng.randrange(3)
        if choice == 0:
            del header[name]
        elif choice == 1:
            header["zzz.bogus"] = {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}
        else:
            header["__metadata__"] = rng.choice([None, 5, {"format": "pt"}, {"a": [1]}, "x"])
    body = json.dumps(header).encode()
    if op == "flip":
        body = bytearray(raw[8:8 + n])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body))
            body[at] ^= rng.randint(1, 255)
        body = bytes(body)
    out = struct.pack("<Q", len(body)) + body + data
    if op == "length":
        out = struct.pack("<Q", rng.choice(_U64 + [n - 1, n + 1, len(raw)])) + out[8:]
    elif op == "truncate":
        out = out[: rng.randrange(len(out))]
    return out


def _number(rng: random.Random) -> str:
    return rng.choice(["0", "-1", "1", "2", "3", "32", "64", "256", "4096", "100000", str(10 ** 12), str(1 << 63),
                       str(10 ** 40), "1e3", "0x10", "nan", "inf", "-0", "", "abc", "٣", "²", "1_000", " 7 "])


def _size(rng: random.Random) -> str:
    return rng.choice(["0", "1", "30MiB", "1GiB", "6GiB", "1e999GiB", "-5GiB", "nanGiB", "infMiB", "5XB", "",
                       "99999999999999999999999TiB", "0.5MiB", "1 GiB"])


def info_argv(rng: random.Random, model: str, scratch: str) -> list[str]:
    argv = ["info", rng.choice([model, model, scratch, "/nonexistent.gguf", "/", "/dev/null", "", "-"])]
    if rng.random() < 0.5:
        argv += ["--gpu-memory", _size(rng)]
    if rng.random() < 0.5:
        argv += ["--ctx", _number(rng)]
    if rng.random() < 0.3:
        argv.append("--json")
    return argv


def generate_argv(rng: random.Random, model: str, scratch: str) -> list[str]:
    """Mostly values that run (so generation itself is fuzzed), some that must be refused."""
    argv = ["generate", "-m", rng.choice([model] * 8 + [scratch, "/nonexistent.gguf", "/"]), "-p", rng.choice(_TEXT)]
    flags = {  # flag: (values that run, values to refuse)
        "-n": (["1", "4", "8", "16", "33"], ["-1", "0", str(10 ** 12), "x"]),
        "--threshold": (["0.1", "0.5", "0.9", "1"], ["0", "1.5", "nan", "inf", "x"]),
        "--steps": (["1", "2", "4", "32", str(10 ** 9)], ["0", "-3"]),
        "--temperature": (["0", "0.7", "2", "1e308"], ["-1", "nan", "inf"]),
        "--top-k": (["1", "5", str(10 ** 12)], ["0", "-2"]),
        "--top-p": (["0.1", "0.5", "1"], ["0", "2", "nan"]),
        "--seed": (["0", "1", str(10 ** 40)], ["-1"]),
        "--threads": (["1", "2"], ["0", "-1", "100000"]),
        "--ctx": (["32", "64", "96", "512", "100000"], ["0", "31", str(10 ** 12)]),
        "--tau": (["1", "2", "7", "auto", "1048576"], ["0", "-1", "x", "²", str(10 ** 30)]),
        "--gpu-memory": (["0", "30MiB", "200MiB", "1GiB"], ["-5GiB", "1e999GiB", "nanGiB", "5XB", ""]),
        "--device": (["cpu", "emulated", "auto"], ["bogus", ""]),
        "--policy": (["tide", "static", "lru", "cpu", "resident", "swap", "prefetch", "adaptive", "ondemand"],
                     ["nope"]),
        "--system": ([t for t in _TEXT if t.isprintable()], ["\udcff", "\x00"]),
        "--trace": ([scratch + ".trace.json"], ["/", "/nonexistent/t.json"]),
        "--static-from": ([], ["/nonexistent.json", model, "/dev/null"]),
    }
    for flag in rng.sample(sorted(flags), rng.randint(0, 6)):
        good, bad = flags[flag]
        argv += [flag, rng.choice(good if good and rng.random() < 0.85 else bad)]
    if "-n" not in argv:
        argv += ["-n", "8"]
    if "--threads" not in argv:
        argv += ["--threads", "1"]
    for flag in rng.sample(["--raw", "--json", "--stats", "--no-cache"], rng.randint(0, 2)):
        argv.append(flag)
    return argv


def convert_argv(rng: random.Random, ckpt: str, scratch: str) -> list[str]:
    argv = ["convert", rng.choice([ckpt] * 4 + ["/nonexistent", "/", scratch, "/dev/null"]), "--dry-run"]
    if rng.random() < 0.7:
        argv += ["-o", rng.choice([scratch + ".out.gguf", "/", "/dev/null", "", "/nonexistent/x.gguf"])]
    if rng.random() < 0.5:
        argv += ["--type", rng.choice(["q8_0", "q4_k_m", "f32", "bf16", "q2_k", ""])]
    if rng.random() < 0.5:
        argv += ["--threads", _number(rng)]
    if rng.random() < 0.3:
        argv.append("-v")
    return argv


# -- the subprocess: run cases, report each ---------------------------------------------------------

_GENERATE = ["generate", "-p", "Hello there", "-n", "8", "--threads", "1"]


class _Hang(BaseException):
    pass


def _cli(argv: list[str]) -> tuple[str, str]:
    """Run `tide ARGV` in this process: ("ok" | "error" | "BAD", detail)."""
    from tide_local.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except SystemExit as stop:  # argparse: --help, or a usage error
        return ("error", "argparse") if stop.code == 2 else ("BAD", f"SystemExit({stop.code})")
    except _Hang:
        raise
    except BaseException as exc:  # anything else escaping the CLI is a bug
        return "BAD", "".join(traceback.format_exception(exc)[-6:])
    text = err.getvalue()
    if rc == 0:
        return "ok", ""
    lines = text.strip().splitlines()
    if rc == 2 and lines and lines[-1].startswith(f"tide {argv[0]}: error: ") and "Traceback" not in text:
        return "error", lines[-1][:300]
    return "BAD", f"exit code {rc}: {text[-2000:]}"


def _run_case(case: dict, ctx: dict) -> tuple[str, str]:
    kind, seed = case["kind"], case["seed"]
    if kind == "gguf":
        base, scratch = ctx["gguf_bytes"], ctx["gguf_scratch"]
        op, patches, cut = gguf_patches(base, seed, tuple(ctx["table"]), ctx["fields"])
        with open(scratch, "r+b") as f:
            for at, data in patches:
                f.seek(at)
                f.write(data)
            if cut is not None:
                f.truncate(cut)
        try:
            outcome = _cli(["info", scratch] + (["--gpu-memory", "30MiB"] if seed % 3 == 0 else []))
            if outcome[0] == "ok" or seed % 4 == 0:  # and load it and generate
                outcome = _cli(_GENERATE + ["-m", scratch])
            return outcome
        finally:
            with open(scratch, "r+b") as f:
                for at, data in patches:
                    f.seek(at)
                    f.write(base[at:at + len(data)])
                if cut is not None:
                    f.seek(cut)
                    f.write(base[cut:])
    if kind == "config":
        ckpt = Path(ctx["ckpt_scratch"])
        original = (ckpt / "config.json").read_text()
        (ckpt / "config.json").write_text(config_text(json.loads(original), seed), encoding="utf-8",
                                          errors="surrogatepass")
        try:
            outcome = _cli(["convert", str(ckpt), "-o", ctx["out"], "--dry-run"])
            if outcome[0] == "ok" and seed % 2 == 0:  # convert it for real, then read it back
                outcome = _cli(["convert", str(ckpt), "-o", ctx["out"], "--type", "f16", "--threads", "1"])
                if outcome[0] == "ok":
                    outcome = _cli(["info", ctx["out"]])
                if outcome[0] == "ok":
                    outcome = _cli(_GENERATE + ["-m", ctx["out"]])
            return outcome
        finally:
            (ckpt / "config.json").write_text(original)
            Path(ctx["out"]).unlink(missing_ok=True)
    if kind == "safetensors":
        ckpt = Path(ctx["ckpt_scratch"])
        shards = sorted(ckpt.glob("*.safetensors"))
        shard = shards[seed % len(shards)]
        raw = shard.read_bytes()
        shard.write_bytes(safetensors_bytes(raw, seed))
        try:
            outcome = _cli(["convert", str(ckpt), "-o", ctx["out"], "--dry-run"])
            if outcome[0] == "ok":
                outcome = _cli(["convert", str(ckpt), "-o", ctx["out"], "--type", "f16", "--threads", "1"])
            return outcome
        finally:
            shard.write_bytes(raw)
            Path(ctx["out"]).unlink(missing_ok=True)
    rng = random.Random(seed)
    if kind == "info-cli":
        return _cli(info_argv(rng, ctx["gguf"], ctx["gguf_scratch"]))
    if kind == "generate-cli":
        sys.stdin = io.StringIO("a prompt on stdin")
        return _cli(generate_argv(rng, ctx["gguf"], ctx["gguf_scratch"]))
    if kind == "convert-cli":
        return _cli(convert_argv(rng, ctx["ckpt"], ctx["gguf_scratch"]))
    raise AssertionError(kind)


def _harness(job_path: str, results_path: str) -> None:
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    job = json.loads(Path(job_path).read_text())
    ctx = job["ctx"]
    if "gguf" in ctx:
        ctx["gguf_bytes"] = Path(ctx["gguf"]).read_bytes()

    def hang(signum, frame):
        raise _Hang()

    signal.signal(signal.SIGALRM, hang)
    with open(results_path, "w") as results:
        for case in job["cases"]:
            results.write(json.dumps({"case": case, "start": True}) + "\n")
            results.flush()
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                outcome, detail = _run_case(case, ctx)
            except _Hang:
                outcome, detail = "BAD", f"no answer within {CASE_SECONDS} s"
            except BaseException as exc:
                outcome, detail = "BAD", "harness: " + "".join(traceback.format_exception(exc)[-6:])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            results.write(json.dumps({"case": case, "outcome": outcome, "detail": detail}) + "\n")
            results.flush()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results.write(json.dumps({"maxrss": maxrss}) + "\n")


if __name__ == "__main__":
    _harness(sys.argv[1], sys.argv[2])
    sys.exit(0)


# -- the tests -----------------------------------------------------------------------------------------

import pytest  # noqa: E402  (the harness above runs without pytest)

from tide_local.converters.convert import convert  # noqa: E402
from tide_local.converters.testmodel import make_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = make_checkpoint(root / "hf", preset="tiny", seed=11, shard_size="2MB")
    gguf = root / "tiny.gguf"
    convert(ckpt, gguf, "q8_0", progress=False, threads=1)
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    table = (int(reader.tensors[0].field.offset), int(reader.data_offset))
    return {"ckpt": str(ckpt), "gguf": str(gguf), "table": table, "fields": _header_fields(reader)}


def _header_fields(reader) -> list:
    """[what, offset, size, kind] of each number in the header: metadata value types, scalar
    values, array item types and counts; tensor infos' dimension counts, dimensions, types, offsets."""
    import numpy as np

    out = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        at = field.offset + 8 + field.parts[1].nbytes
        out.append(["type", at, 4, "u"])
        if len(field.parts) == 4:  # a scalar
            dtype = field.parts[3].dtype
            out.append(["value", at + 4, dtype.itemsize, "b" if dtype == np.bool_ else dtype.kind])
        elif len(field.parts) > 4:  # an array: item type, count
            out += [["item type", at + 4, 4, "u"], ["count", at + 8, 8, "u"]]
    for tensor in reader.tensors:
        parts, at = tensor.field.parts, tensor.field.offset + 8 + tensor.field.parts[1].nbytes
        n_dims = int(parts[2][0])
        out.append(["n_dims", at, 4, "u"])
        out += [["dim", at + 4 + 8 * i, 8, "u"] for i in range(n_dims)]
        out += [["ggml type", at + 4 + 8 * n_dims, 4, "u"], ["offset", at + 8 + 8 * n_dims, 8, "u"]]
    return [[w, int(a), int(n), k] for w, a, n, k in out]


def _run(cases: list[dict], files: dict, tmp_path: Path) -> list[dict]:
    scratch = tmp_path / "scratch.gguf"
    shutil.copyfile(files["gguf"], scratch)
    ckpt_scratch = tmp_path / "ckpt"
    shutil.copytree(files["ckpt"], ckpt_scratch)
    ctx = {**files, "gguf_scratch": str(scratch), "ckpt_scratch": str(ckpt_scratch), "out": str(tmp_path / "o.gguf")}
    job, results = tmp_path / "job.json", tmp_path / "results.jsonl"
    job.write_text(json.dumps({"ctx": ctx, "cases": cases}))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TIDE_CACHE_DIR": str(tmp_path / "cache")}
    try:
        proc = subprocess.run([sys.executable, __file__, str(job), str(results)], capture_output=True, text=True,
                              timeout=GROUP_TIMEOUT, env=env)
        failure = None if proc.returncode == 0 else f"the harness ended with {proc.returncode}: {proc.stderr[-3000:]}"
    except subprocess.TimeoutExpired:
        failure = f"the harness did not finish in {GROUP_TIMEOUT} s"
    lines = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if failure:
        started = [line["case"] for line in lines if line.get("start")]
        pytest.fail(f"{failure}; last case started: {started[-1] if started else None}")
    done = [line for line in lines if "outcome" in line]
    assert len(done) == len(cases)
    bad = [f"{d['case']}: {d['detail']}" for d in done if d["outcome"] == "BAD"]
    assert not bad, "\n\n".join(bad[:5])
    maxrss = next(line["maxrss"] for line in lines if "maxrss" in line)
    assert maxrss < MEM_LIMIT
    return done


def _kinds(done: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in done:
        counts[d["outcome"]] = counts.get(d["outcome"], 0) + 1
    return counts


def test_mutated_gguf_headers_and_tensor_tables(files, tmp_path):
    done = _run([{"kind": "gguf", "seed": s} for s in range(300 * SCALE)], files, tmp_path)
    counts = _kinds(done)
    assert counts.get("error", 0) > 100  # most mutations are caught ...
    assert counts.get("ok", 0) > 0  # ... and some land where nothing checks (names, padding, text)


def test_mutated_config_json_and_safetensors_headers(files, tmp_path):
    cases = [{"kind": "config", "seed": s} for s in range(60 * SCALE)]
    cases += [{"kind": "safetensors", "seed": s} for s in range(60 * SCALE)]
    counts = _kinds(_run(cases, files, tmp_path))
    assert counts.get("error", 0) > 40


def test_random_command_lines(files, tmp_path):
    cases = [{"kind": kind, "seed": s} for kind in ("info-cli", "convert-cli") for s in range(60 * SCALE)]
    cases += [{"kind": "generate-cli", "seed": s} for s in range(80 * SCALE)]
    counts = _kinds(_run(cases, files, tmp_path))
    assert counts.get("ok", 0) > 10 and counts.get("error", 0) > 10
