"""llama.cpp on the same weights: a `bailingmoe2` copy of a LLaDA2 GGUF, timed batch decodes.

llama.cpp has no LLaDA2, but its ``bailingmoe2`` architecture (Ling 2.0) is the same MoE
transformer with causal attention and no diffusion loop. Our GGUF already uses its tensor
names; only the architecture name and the ``llada2.*`` key prefix differ. Those keys are
read by llama.cpp without overrides (several must exist in the file), and ext4 cannot share
extents, so the view is a full copy with a rewritten header, cached beside the model.

The timing mirrors one of our denoising steps: the context is decoded once into llama.cpp's
KV cache, then one batch of tokens at the next positions is decoded and removed again,
repeatedly, with logits for every token of the batch.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tide_local.errors import LlamaCppError
from tide_local.gguf import GGUFFile, GGUFStreamWriter
from tide_local.gguf.writer import check_output_path, remove_stale_partials
from tide_local.architecture import ARCH
from tide_local.progress import Progress, human_bytes

LLAMA_ARCH = "bailingmoe2"


def view_path(model: Path, cache: Path | None = None) -> Path:
    """Where the bailingmoe2 copy of `model` lives (beside it, or under `cache`)."""
    model = Path(model)
    return (cache or model.parent) / f"{model.stem}.{LLAMA_ARCH}.gguf"


def write_bailingmoe2_copy(model: Path, out: Path, progress: bool = True) -> Path:
    """Copy `model` with `general.architecture = bailingmoe2` and `llada2.*` keys renamed.

    Tensor bytes are copied unchanged (same types, same order, same alignment); the
    ``tide.*`` keys are dropped. Reuses `out` when it is newer than the model. The copy is
    written to a temporary file and renamed, so an interrupted run (SIGTERM, SIGHUP, ... too)
    leaves nothing; what a killed one left is removed by the next."""
    model, out = Path(model), Path(out)
    if out.is_file() and out.stat().st_mtime >= model.stat().st_mtime:
        return out
    target = check_output_path(out)
    remove_stale_partials(target.parent if str(target.parent) else Path("."))
    src = GGUFFile(model)
    try:
        if src.metadata.get("general.architecture") != ARCH:
            raise LlamaCppError(f"{model}: not a LLaDA2 GGUF (architecture "
                                f"{src.metadata.get('general.architecture')!r})")
        need = sum(t.nbytes for t in src.tensors.values()) + (64 << 20)
        free = shutil.disk_usage(out.parent).free
        if free < need:
            raise LlamaCppError(f"{out.parent}: the llama.cpp copy needs {human_bytes(need)} free, "
                                f"{human_bytes(free)} is")
        with GGUFStreamWriter(out, alignment=src.alignment) as w:
            for key, value in src.metadata.items():
                if key == "general.alignment" or key.startswith("tide."):
                    continue
                vtype, item_type = src.value_types[key]
                if key == "general.architecture":
                    value = LLAMA_ARCH
                elif key.startswith(ARCH + "."):
                    key = LLAMA_ARCH + key[len(ARCH):]
                w.add(key, value, vtype, item_type)
            for t in src.tensors.values():
                w.add_tensor(t.name, t.ne, t.ggml_type)
            w.begin_data()
            bar = Progress(f"llama.cpp copy {out.name}", w.total_size(), len(src.tensors), enabled=None if progress else False)
            chunk = 64 << 20
            for t in src.tensors.values():
                data = src.tensor_data(t.name)
                for lo in range(0, t.nbytes, chunk):
                    w.write(t.name, data[lo:lo + chunk])
                    bar.advance(min(chunk, t.nbytes - lo))
                bar.advance(items=1)
            w.finish()
            bar.close()
    finally:
        src.close()
    return out


def _llama():
    try:
        import llama_cpp
    except ImportError as err:  # it is a dependency; a broken install still deserves one line
        raise LlamaCppError(f"llama-cpp-python is not importable: {err}") from None
    return llama_cpp


_LOG_CB = None  # keeps the ctypes callback alive


def _quiet(ll) -> None:
    """Silence llama.cpp's loader chatter (errors still reach us as return codes)."""
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = ll.llama_log_callback(lambda level, text, data: None)
        ll.llama_log_set(_LOG_CB, ctypes.c_void_p())


class LlamaCppRunner:
    """A llama.cpp model and context over a bailingmoe2 GGUF, for timed batch decodes."""

    def __init__(self, path: Path, threads: int, n_ctx: int, batch: int = 32, verbose: bool = False,
                 extra_bufts: bool = False, f32_attention: bool = False):
        ll = self._ll = _llama()
        if not verbose:
            _quiet(ll)
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = 0
        # llama.cpp's `--no-repack`: its extra CPU buffer types start with AMX, which faults
        # (SIGILL) on machines that advertise AMX without enabling it for the process
        mp.use_extra_bufts = extra_bufts
        t0 = time.perf_counter()
        self.model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {path}")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = max(batch, 512)
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if f32_attention:  # for comparing logits: an f32 KV cache, softmax attention (no f16 rounding)
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
            cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise LlamaCppError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.load_s = time.perf_counter() - t0
        self.threads, self.n_ctx = threads, n_ctx
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self._capacity = max(batch, 512)
        self._batch = ll.llama_batch_init(self._capacity, 0, 1)
        self.n_past = 0

    def _decode(self, ids: np.ndarray, start: int, logits: bool) -> None:
        ll, b = self._ll, self._batch
        n = len(ids)
        if n > self._capacity:  # the batch's C arrays hold this many tokens
            raise LlamaCppError(f"{n} tokens exceed the batch of {self._capacity}")
        if start + n > self.n_ctx:
            raise LlamaCppError(f"positions up to {start + n} exceed the context of {self.n_ctx}")
        for i, tok in enumerate(ids):
            b.token[i] = int(tok)
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits
        b.n_tokens = n
        rc = ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed with {rc} ({n} tokens at position {start})")
        ll.llama_synchronize(self.ctx)

    def set_threads(self, threads: int) -> None:
        self._ll.llama_set_n_threads(self.ctx, threads, threads)
        self.threads = threads

    def prefill(self, ids: np.ndarray, chunk: int = 512) -> None:
        """Decode `ids` into an emptied KV cache (no logits)."""
        self._ll.llama_memory_clear(self._ll.llama_get_memory(self.ctx), True)
        for lo in range(0, len(ids), chunk):
            self._decode(ids[lo:lo + chunk], lo, False)
        self.n_past = len(ids)

    def time_batch(self, ids: np.ndarray) -> float:
        """Seconds to decode `ids` at the end of the context with logits for each (the batch
        is then removed from the KV cache, so every call sees the same context)."""
        t0 = time.perf_counter()
        self._decode(ids, self.n_past, True)
        dt = time.perf_counter() - t0
        mem = self._ll.llama_get_memory(self.ctx)
        self._ll.llama_memory_seq_rm(mem, 0, self.n_past, -1)
        return dt

    def logits(self, n: int) -> np.ndarray:
        ptr = self._ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()

    def close(self) -> None:
        ll = self._ll
        if getattr(self, "_batch", None) is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LlamaCppProcess:
    """A LlamaCppRunner in a child process, driven over a pipe (one JSON line per call).

    llama.cpp shares ggml's OpenMP runtime, which reads its settings once per process; ours
    sleeps its threads between graphs (OMP_WAIT_POLICY=passive). In a child llama.cpp runs
    with the environment a llama.cpp user has (the policy only if the user set it), and
    its timings are taken there, so only the pipe's round trip is outside them."""

    def __init__(self, path: Path, threads: int, n_ctx: int, batch: int = 32):
        from tide_local.ggml import _lib  # what the user's environment said before our default

        env = dict(os.environ)
        if _lib.USER_OMP_WAIT_POLICY is None:
            env.pop("OMP_WAIT_POLICY", None)
        else:
            env["OMP_WAIT_POLICY"] = _lib.USER_OMP_WAIT_POLICY
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tide_local.bench.llamacpp", str(path), str(threads), str(n_ctx), str(batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        ready = self._reply()
        self.load_s, self.threads, self.n_ctx = ready["load_s"], threads, n_ctx

    def _reply(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise LlamaCppError(f"the llama.cpp process exited ({'signal ' + str(-code) if code < 0 else code})")
        reply = json.loads(line)
        if "error" in reply:
            raise LlamaCppError(reply["error"])
        return reply

    def _call(self, op: str, **args) -> dict:
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def set_threads(self, threads: int) -> None:
        self._call("threads", n=int(threads))
        self.threads = threads

    def prefill(self, ids: np.ndarray) -> None:
        self._call("prefill", ids=[int(i) for i in ids])

    def time_batch(self, ids: np.ndarray) -> float:
        return self._call("time", ids=[int(i) for i in ids])["seconds"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(argv: list[str]) -> None:
    """The child side of LlamaCppProcess: load, say ready, answer calls until stdin closes."""
    path, threads, n_ctx, batch = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    out = sys.stdout
    try:
        runner = LlamaCppRunner(path, threads, n_ctx, batch)
    except LlamaCppError as err:
        out.write(json.dumps({"error": str(err)}) + "\n")
        return
    out.write(json.dumps({"load_s": runner.load_s}) + "\n")
    out.flush()
    with runner:
        for line in sys.stdin:
            msg = json.loads(line)
            try:
                if msg["op"] == "threads":
                    runner.set_threads(msg["n"])
                    reply = {}
                elif msg["op"] == "prefill":
                    runner.prefill(np.array(msg["ids"], np.int32))
                    reply = {}
                else:
                    reply = {"seconds": runner.time_batch(np.array(msg["ids"], np.int32))}
            except LlamaCppError as err:
                reply = {"error": str(err)}
            out.write(json.dumps(reply) + "\n")
            out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1:])
