"""The public engine: load a GGUF, then logits / generate / stream / chat.

    import tide_local
    eng = tide_local.load("model.gguf", device="auto", gpu_memory="6GiB")
    res = eng.generate("The capital of France is", max_new_tokens=64)
    print(res.text, res.stats.tokens_per_second)
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

from tide_local import ggml
from tide_local.diffusion import (BlockEvent, DecodeOptions, DecodeResult, PassInfo, StepEvent, WindowModel,
                                  iter_decode)
from tide_local.diffusion.batch import SequenceFailed
from tide_local.diffusion.options import option_default, option_specs
from tide_local.errors import BudgetError, ContextError, DeviceError, EngineBusyError, GGUFError
from tide_local.ggml.backend import usable_cores
from tide_local.experts.memory import MemoryPlan, budget_for_slots, parse_memory, plan_memory
from tide_local.experts.offload import HybridExperts
from tide_local.experts.policies import DEFAULT_TAU, POLICIES, make_policy
from tide_local.experts.trace import RoutingTrace
from tide_local.model.forward import LLaDA2Model
from tide_local.model.timing import PhaseTimer
from tide_local.model.weights import Weights
from tide_local.modelfile import ModelFile
from tide_local.results import GenerationResult, GenerationStats
from tide_local.tokenizer import Tokenizer

# Attention scores of one prefill chunk stay under this many bytes.
PREFILL_SCORE_BYTES = 1 << 28
DEFAULT_CONTEXT = 4096


def prefill_chunk(cfg, n_tokens: int, block_length: int) -> int:
    """Tokens per prefill pass for a prompt of `n_tokens`: one chunk's attention scores
    [n_kv, chunk, heads] stay under PREFILL_SCORE_BYTES (whole blocks, at most 512)."""
    chunk = PREFILL_SCORE_BYTES // (4 * cfg.n_heads * n_tokens)
    return max(block_length, min(512, chunk) // block_length * block_length)


# Below this hidden size one thread is faster: ggml's CPU backend synchronises its threads after
# every op (~28 us each on a 2-core Xeon with OpenMP's passive waiting, which we set), and a
# small model's ops take a few microseconds (the demo: 315 tokens/s on 1 thread, 156 on 2).
SMALL_HIDDEN_SIZE = 512


def default_threads(cfg) -> int:
    """CPU threads when none are given: 1 for a small model, else the cores this process may run
    on (its CPU affinity)."""
    return 1 if cfg.hidden_size < SMALL_HIDDEN_SIZE else usable_cores()


class CachedBlockModel:
    """The decoder's view of the model: prefill, per-step block logits, block commits, each
    forward told what it is for (PassInfo: the expert offload refreshes by it)."""

    def __init__(self, model: LLaDA2Model, block_length: int):
        self.model = model
        self.block_length = block_length
        self.forwards = 0
        self.forwarded_tokens = 0

    def _forward(self, tokens, start, info: PassInfo, rows=None):
        self.forwards += 1
        self.forwarded_tokens += len(tokens)
        return self.model.forward(tokens, start, rows=rows, info=info)

    def prefill(self, tokens: np.ndarray) -> None:
        n = len(tokens)
        if n == 0:
            return
        self.model.ensure_capacity(n)
        chunk = prefill_chunk(self.model.config, n, self.block_length)
        for start in range(0, n, chunk):
            self._forward(tokens[start:start + chunk], start, PassInfo("prefill"))

    def block_logits(self, block: np.ndarray, start: int, rows: np.ndarray, step: int = 0) -> np.ndarray:
        return self._forward(block, start, PassInfo.step_at(start, self.block_length, step), rows)

    def commit_block(self, block: np.ndarray, start: int) -> None:
        self._forward(block, start, PassInfo.commit_at(start, self.block_length))


class RecomputeBlockModel(WindowModel):
    """Without the KV cache: every step forwards the whole window from position 0 (a check of
    the cache; the paper's own regime), each forward still told its block and step."""

    def __init__(self, model: LLaDA2Model, block_length: int):
        super().__init__(None, block_length)
        self.model = model

    def window_logits(self, window: np.ndarray, rows: np.ndarray, info: PassInfo) -> np.ndarray:
        return self.model.forward(window, 0, rows=rows, info=info)


def _file_identity(path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _resolve_device(device: str, threads: int):
    """(device backend or None for CPU-only, a label)."""
    if device == "cpu":
        return None, "cpu"
    if device == "emulated":
        # a second CPU backend standing in for an accelerator (tests and studies)
        return ggml.Backend.cpu(max(1, threads // 2)), "emulated"
    if device == "auto":
        backend = ggml.Backend.best_accelerator()
        return (backend, backend.name) if backend is not None else (None, "cpu")
    names = [d.name for d in ggml.accelerator_devices()]
    if device not in names:
        raise DeviceError(
            f"no device '{device}' (accelerators in this libggml: {', '.join(names) or 'none'}; "
            "use device='cpu', 'auto' or 'emulated', or point TIDE_GGML_LIB_DIR at a GPU build)"
        )
    backend = ggml.Backend.from_device(device)
    return backend, backend.name


def _decoding_keywords(func):
    """Give `func(self, prompt, *, ..., **options)` the decoding options as real keyword
    parameters in its signature and docstring, from the one table (DecodeOptions' fields),
    so that help() and IDEs show them and nothing spells them out again here."""
    specs = option_specs()
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    for name, spec in specs.items():
        default = None if spec.model_default else option_default(name)
        annotation = f"{spec.kind.__name__} | None" if default is None else spec.kind.__name__
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    func.__signature__ = sig.replace(parameters=params)
    lines = [f"    {name}: {spec.help}" + (" [the model's default when None]" if spec.model_default else "")
             for name, spec in specs.items()]
    func.__doc__ = (func.__doc__ or "") + "\n\n    Decoding options:\n" + "\n".join(lines) + "\n"
    return func


class Engine:
    """A loaded LLaDA2 model: its file, tokenizer, forward and (with a device) expert offload.

    Make one with :func:`tide_local.load`. ``generate`` decodes a prompt, ``stream`` yields
    the steps and blocks as they happen, ``chat`` renders messages with the model's chat
    template, ``logits`` runs one plain forward. Close it (or use ``with``) to release the
    device and the mapped file.

    Attributes users read: ``config`` (the model's hyperparameters), ``tokenizer``,
    ``device`` (its name, or "cpu"), ``n_ctx`` (the context the KV cache is planned for),
    ``plan`` (the device memory plan, None on the CPU), ``policy``, ``tau`` and ``tau_source``
    (why that tau), ``offload`` (the hybrid experts executor, None on the CPU), ``defaults``
    (the model's decoding defaults)."""

    def __init__(self, path: str | os.PathLike, *, device: str = "auto", gpu_memory: str | int | None = None,
                 policy: str = "tide", tau: int | str = "auto", threads: int | None = None, n_ctx: int | None = None,
                 expert_slots: int | None = None, popularity: dict[int, np.ndarray] | None = None,
                 max_batch: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy '{policy}' (choose from {', '.join(POLICIES)})")
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.max_batch = max_batch
        self.file = ModelFile(path)
        self.offload: HybridExperts | None = None
        try:
            self._open(device, gpu_memory, policy, tau, threads, n_ctx, expert_slots, popularity)
        except BaseException:  # a failure after the file opened (tokenizer, device, budget) releases it
            self.close()
            raise

    def _open(self, device, gpu_memory, policy, tau, threads, n_ctx, expert_slots, popularity) -> None:
        self._file_identity = _file_identity(self.file.path)
        self._lock, self._owner = threading.Lock(), None
        self.config = self.file.config
        self.tokenizer = Tokenizer.from_gguf(self.file.gguf, vocab_size=self.config.vocab_size,
                                             max_tokens=self.config.context_length)
        ids = self.file.special_ids
        self.mask_id, self.eos_id = ids["mask"], ids["eos"]
        self.role_end_id = ids.get("role_end")
        self.defaults = self.file.decoding_defaults()
        threads = threads or default_threads(self.config)
        self.n_ctx = min(self.config.context_length, n_ctx or DEFAULT_CONTEXT)
        device_backend, self.device = _resolve_device(device, threads)
        # the CPU share gets every core, except beside the emulated device, which computes on half of them
        self.cpu_backend = ggml.Backend.cpu(max(1, threads - threads // 2) if self.device == "emulated" else threads)
        self.plan: MemoryPlan | None = None
        self.policy = "cpu-only" if device_backend is None else policy
        self.tau = self.tau_source = None
        self.timer = PhaseTimer()
        if device_backend is None:
            self.backend = self.cpu_backend
            weights = Weights(self.file, None)
        else:
            self.backend = device_backend
            if expert_slots is not None:  # a budget stated as slots per layer (studies, benchmarks)
                gpu_memory = budget_for_slots(self.file, expert_slots, self.n_ctx, self.max_batch)
            self.plan = self._plan(device_backend, gpu_memory, policy, expert_slots)
            if policy in ("tide", "prefetch") and tau == "auto":  # the cached plan of `tide plan`, else DEFAULT_TAU (and why)
                from tide_local.planner.lookup import auto_placement

                auto = auto_placement(self.file, self.plan, self.device, DEFAULT_TAU)
                self.tau, self.plan, self.tau_source = auto.tau, auto.plan, auto.source
            elif policy in ("tide", "prefetch"):
                self.tau, self.tau_source = int(tau), "given"
            prices = None
            if policy == "adaptive":  # its prices come from the device profile, like tau="auto"'s plan
                from tide_local.planner.lookup import adaptive_prices

                prices, self.tau_source = adaptive_prices(self.file, self.device)
            weights = Weights(self.file, device_backend)
            self.offload = HybridExperts(self.file, weights, device_backend, self.cpu_backend, self.plan,
                                         make_policy(policy, self.tau or DEFAULT_TAU, popularity, prices))
        self.model = LLaDA2Model(self.file, weights, self.backend, block_length=self.defaults["block_length"],
                                 experts=self.offload, max_positions=self.n_ctx, timer=self.timer)

    def _plan(self, device_backend, gpu_memory, policy: str, expert_slots: int | None = None) -> MemoryPlan:
        if gpu_memory is None:
            if self.device == "emulated":
                budget = plan_memory(self.file, 1 << 62, self.n_ctx, max_slots=0, sequences=self.max_batch).fixed_bytes
                budget += self.file.expert_bytes() // 2  # room for half the experts
            else:
                free, total = self.backend_device_memory(device_backend)
                budget = free - max(512 << 20, total // 10)
        else:
            budget = parse_memory(gpu_memory)
        # slots asked for are what is used, also below K where a pool holds K anyway
        plan = plan_memory(self.file, budget, self.n_ctx, max_slots=0 if policy == "cpu" else expert_slots,
                           sequences=self.max_batch)
        if policy == "resident" and any(n < self.config.n_experts for n in plan.slots.values()):
            need = plan.fixed_bytes + plan.expert_bytes * len(plan.slots) * self.config.n_experts
            from tide_local.units import human_bytes  # MiB below 1 GiB, not "0.04 GiB"

            raise BudgetError(f"policy 'resident' keeps every expert on the device: it needs {human_bytes(need)} "
                              f"(the budget is {human_bytes(budget)})")
        return plan

    @staticmethod
    def backend_device_memory(backend) -> tuple[int, int]:
        return backend.device.memory() if backend.device is not None else (0, 0)

    @property
    def threads(self) -> int:
        return self.backend.n_threads

    # -- inputs ------------------------------------------------------------------------------
    def _ids(self, prompt) -> np.ndarray:
        if isinstance(prompt, str):  # a text too long for n_ctx is refused before tokenizing (ContextError)
            ids = self.tokenizer.encode(prompt, max_tokens=self.n_ctx)
        else:
            ids = list(prompt)
            if not all(isinstance(i, (int, np.integer)) for i in ids):
                raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("the prompt is empty")
        arr = np.asarray(ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        return arr.astype(np.int32)

    def decode_options(self, **options) -> DecodeOptions:
        """The decoding options a call with these keywords uses: the given ones (None: not
        given) over the model's defaults, validated (TypeError for an unknown name,
        ValueError for a bad value)."""
        opts = DecodeOptions.build(options, self.defaults)
        if opts.block_length != self.model.block_length:
            raise ValueError(f"block_length must be {self.model.block_length} for this model (it was trained so)")
        return opts

    def check_context(self, n_prompt: int, max_new_tokens: int) -> None:
        """The one context check, made before any work: prompt + answer, in whole blocks, must
        fit the context this engine was loaded with (n_ctx). Raises ContextError naming the fix."""
        B = self.model.block_length
        needed = -(-(n_prompt + max_new_tokens) // B) * B
        if needed <= self.n_ctx:
            return
        if needed <= self.config.context_length:
            fix = (f"load with a larger context (n_ctx={needed} in Python, --ctx {needed} on the command line; "
                   f"the model takes up to {self.config.context_length})")
        else:
            fix = f"shorten the prompt or ask for fewer tokens (the model's context is {self.config.context_length})"
        raise ContextError(f"a prompt of {n_prompt} tokens plus {max_new_tokens} new tokens needs {needed} positions "
                           f"(whole blocks of {B}) but the context is {self.n_ctx}: {fix}")

    # -- one call at a time --------------------------------------------------------------------
    @contextmanager
    def _exclusive(self):
        """The engine's model and cache serve one call at a time: calls from other threads wait
        their turn (each result is what it would be alone); a second call in the thread that
        holds an unfinished stream is refused. The mapped file is checked first."""
        me = threading.get_ident()
        if self._owner == me:
            raise EngineBusyError("this engine is still generating in this thread (a stream not run to its end): "
                                  "finish it or close() it before the next call")
        with self._lock:
            self._owner = me
            try:
                self._check_file()
                yield
            finally:
                self._owner = None

    def _check_file(self) -> None:
        """A model file changed under a running engine would be read half old, half new (or kill
        the process with SIGBUS when it shrank): refuse it before any work."""
        now = _file_identity(self.file.path)
        if now != self._file_identity:
            raise GGUFError(f"{self.file.path}: the file changed on disk since it was loaded (size, time or inode); "
                            "load it again")

    # -- the API -----------------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: one full forward of token ids at positions 0..n-1 with the
        block-causal mask, no cache. Raises ContextError past the context."""
        arr = self._ids(ids)
        if len(arr) > self.n_ctx:
            self.check_context(len(arr), 0)
        with self._exclusive():
            return self.model.forward(arr, 0, rows=np.arange(len(arr)))

    @_decoding_keywords
    def stream(self, prompt: str | Sequence[int], *, kv_cache: bool = True, stop_ids: Sequence[int] | None = None,
               cancel=None, **options) -> Iterator[StepEvent | BlockEvent | GenerationResult]:
        """Decode `prompt` (a string used as is, or token ids), yielding as decoding goes: a
        StepEvent per denoising step, a BlockEvent per finished block (its ``answer`` holds the
        answer's new tokens), and the GenerationResult last.

        The request is checked before the first event (ValueError / ContextError).
        kv_cache: False recomputes the whole window at every step (slow, same tokens: a check).
        stop_ids: ids that end the answer (default: end-of-text).
        cancel: a threading.Event; once set, decoding ends before the next step with the
          finished blocks and ``finish_reason`` "cancelled"."""
        return self._stream(*self._request(prompt, stop_ids, options), kv_cache, cancel)

    def _request(self, prompt, stop_ids, options: dict) -> tuple[np.ndarray, DecodeOptions, list[int]]:
        """One decode's checked inputs, before any work: (token ids, decoding options, stop ids;
        default end-of-text). ValueError / ContextError for a bad one."""
        ids = self._ids(prompt)
        opts = self.decode_options(**options)
        self.check_context(len(ids), opts.max_new_tokens)
        return ids, opts, [self.eos_id] if stop_ids is None else list(stop_ids)

    def _stream(self, ids, opts: DecodeOptions, stops: list[int], kv_cache: bool, cancel):
        with self._exclusive():  # taken at the first event, released at the last (or on close)
            yield from self._decode(ids, opts, kv_cache, stops, cancel)

    def _decode(self, ids, opts: DecodeOptions, kv_cache: bool, stops: list[int], cancel):
        if kv_cache:
            block_model = CachedBlockModel(self.model, opts.block_length)
        else:
            block_model = RecomputeBlockModel(self.model, opts.block_length)
        if self.offload is not None:
            self.offload.reset_stats()
        self.timer.reset()
        start = time.perf_counter()
        for event in iter_decode(block_model, ids, opts, mask_id=self.mask_id, stop_ids=stops, cancel=cancel):
            if isinstance(event, DecodeResult):
                stats = self._stats(event, block_model, kv_cache, time.perf_counter() - start)
                yield GenerationResult(event.tokens, self.tokenizer.decode(event.tokens), stats)
            else:
                yield event

    def _stats(self, result: DecodeResult, block_model, kv_cache: bool, wall: float) -> GenerationStats:
        compute = self.timer.compute_seconds
        offload = self.offload.report(self.tau, self.tau_source) if self.offload is not None else None
        moved = offload.wait_seconds + offload.upload_seconds if offload is not None else 0.0
        return GenerationStats(**vars(result.stats), wall_seconds=wall, forwards=block_model.forwards,
                               forwarded_tokens=block_model.forwarded_tokens, kv_cache=kv_cache, device=self.device,
                               device_compute_seconds=compute, host_seconds=wall - compute - moved, offload=offload)

    @_decoding_keywords
    def generate(self, prompt: str | Sequence[int], *, kv_cache: bool = True, stop_ids: Sequence[int] | None = None,
                 cancel=None, **options) -> GenerationResult:
        """Decode `prompt` (a string used as is, no chat template; or token ids) and return the
        GenerationResult: tokens, text, stats (see `stream` for the other arguments)."""
        result = None
        for event in self.stream(prompt, kv_cache=kv_cache, stop_ids=stop_ids, cancel=cancel, **options):
            result = event
        return result

    @contextmanager
    def batch(self, max_batch: int | None = None):
        """Decode several prompts together (a context manager yielding an EngineBatch: see
        tide_local.batching). It holds the engine while open, like a stream. `max_batch`:
        sequences at once, at most the engine's own (the device plan holds that many KV caches)."""
        from tide_local.batching import EngineBatch

        n = self.max_batch if max_batch is None else max_batch
        if not (isinstance(n, int) and 1 <= n <= self.max_batch):
            raise ValueError(f"max_batch must be 1..{self.max_batch} for this engine (load it with max_batch=N for more)")
        with self._exclusive():
            self.model.drop_cache()  # the batch's sequences bring caches of their own
            if self.offload is not None:
                self.offload.reset_stats()
                self.offload.log_steps = False  # a batch may run for hours; its steps report their own counts
            self.timer.reset()
            batch = EngineBatch(self, n)
            try:
                yield batch
            finally:
                batch.close()
                if self.offload is not None:
                    self.offload.log_steps = True

    @_decoding_keywords
    def generate_batch(self, prompts: Sequence[str | Sequence[int]], *, stop_ids: Sequence[int] | None = None,
                       max_batch: int | None = None, **options) -> list[GenerationResult]:
        """Decode `prompts` together, up to `max_batch` at a time (default and at most the engine's:
        load(..., max_batch=N); the others join as sequences finish), and return their
        GenerationResults in order. Each one's tokens are those of `generate(prompt, ...)` on f32 and q8_0 models
        (K-quants: with GGML_CPU_TILED_MM=0). Every prompt is checked before any decoding."""
        requests = [self._request(prompt, stop_ids, options) for prompt in prompts]  # all checked before any work
        results: list[GenerationResult | None] = [None] * len(requests)
        with self.batch(max_batch) as batch:
            waiting = list(enumerate(requests))[::-1]
            while waiting or batch.running:
                while waiting and batch.has_room():
                    i, request = waiting.pop()
                    batch.add_checked(i, *request)
                for i, event in batch.step():
                    if isinstance(event, GenerationResult):
                        results[i] = event
                    elif isinstance(event, SequenceFailed):
                        raise event.error
        return results

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template, ready for the answer.
        The render and the tokenizing are bounded by the loaded context (n_ctx)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  max_chars=self.tokenizer.text_limit(self.n_ctx))
        return self.tokenizer.encode(text, max_tokens=self.n_ctx)

    def chat_stop_ids(self) -> list[int]:
        return [self.eos_id] + ([self.role_end_id] if self.role_end_id is not None else [])

    @_decoding_keywords
    def chat(self, messages: list[dict], *, kv_cache: bool = True, cancel=None, **options) -> GenerationResult:
        """Render `messages` ([{"role": "system"|"user"|"assistant", "content": ...}]) with the
        model's chat template and answer; stops at end-of-text or <|role_end|>."""
        return self.generate(self.chat_prompt(messages), kv_cache=kv_cache, stop_ids=self.chat_stop_ids(),
                             cancel=cancel, **options)

    # -- routing traces ------------------------------------------------------------------------
    def record_trace(self) -> RoutingTrace:
        """Start recording the routing of every pass (for the planner and `static`); returns the trace."""
        cfg = self.config
        trace = RoutingTrace(self.file.path.name, cfg.n_experts, cfg.n_experts_used, list(cfg.moe_layers))
        self.model.observe_routing(trace)
        if self.offload is not None:  # with a device, the per-layer timeline of uploads, device and CPU too
            self.offload.record_timeline()
        return trace

    def stop_trace(self) -> RoutingTrace | None:
        trace = self.model.routing_observer
        self.model.observe_routing(None)
        if self.offload is not None and trace is not None:
            trace.timeline = self.offload.timeline_seconds()
            self.offload.record_timeline(False)
        return trace

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str | os.PathLike, *, device: str = "auto", gpu_memory: str | int | None = None, policy: str = "tide",
         tau: int | str = "auto", threads: int | None = None, n_ctx: int | None = None,
         expert_slots: int | None = None, popularity: dict[int, np.ndarray] | None = None,
         max_batch: int = 1) -> Engine:
    """Open a LLaDA2 GGUF (written by `tide convert`) for generation; returns an Engine.

    device: "auto" (an accelerator of the loaded libggml if any, else the CPU), "cpu",
      "emulated" (a second CPU backend standing in for an accelerator: a test and study
      tool with the same slot accounting and counted transfers), or a device name.
    gpu_memory: the device budget ("6GiB", "6000MiB" or bytes; None: free memory minus a reserve).
    policy: tide | swap | static | lru | cpu | resident (see tide_local.experts.policies).
    tau: TIDE's refresh interval in steps ("auto": the plan cached by `tide plan`; 4 until then).
    threads: CPU threads (default: the cores this process may use; 1 for a model of hidden size
      below 512, whose ops are too small to share).
    n_ctx: the context to plan the KV cache and device memory for (default: 4096, or the
      model's if smaller); a longer prompt + answer raises ContextError.
    expert_slots: the device budget stated as expert slots per MoE layer (studies, benchmarks).
    popularity: per MoE layer, routed counts per expert (RoutingTrace.popularity()): the
      experts the static policy keeps.
    max_batch: sequences `generate_batch` / `batch()` decode together (the device memory plan
      holds a KV cache of n_ctx for each).
    """
    return Engine(path, device=device, gpu_memory=gpu_memory, policy=policy, tau=tau, threads=threads, n_ctx=n_ctx,
                  expert_slots=expert_slots, popularity=popularity, max_batch=max_batch)
