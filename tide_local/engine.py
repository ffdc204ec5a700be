"""The public engine: load a GGUF, then logits / generate / stream / chat.

    import tide_local
    eng = tide_local.load("model.gguf")
    res = eng.generate("The capital of France is", max_new_tokens=64)
    print(res.text, res.stats["tokens_per_second"])
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from tide_local import ggml
from tide_local.errors import DeviceError, TideError
from tide_local.experts.memory import BudgetError, MemoryPlan, budget_for_slots, parse_memory, plan_memory
from tide_local.experts.offload import ExpertOffload
from tide_local.experts.policies import POLICIES, make_policy
from tide_local.experts.trace import RoutingTrace
from tide_local.diffusion import BlockEvent, DecodeOptions, DecodeResult, StepEvent, WindowModel, iter_decode
from tide_local.model.forward import LLaDA2Model
from tide_local.modelfile import ModelFile
from tide_local.tokenizer import Tokenizer

# Attention scores of one prefill chunk stay under this many bytes.
PREFILL_SCORE_BYTES = 1 << 28


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    stats: dict = field(default_factory=dict)


class CachedBlockModel:
    """The decoder's view of the model: prefill, per-step block logits, block commits."""

    def __init__(self, model: LLaDA2Model, block_length: int):
        self.model = model
        self.block_length = block_length
        self.forwards = 0
        self.forwarded_tokens = 0

    def _forward(self, tokens, start, rows=None):
        self.forwards += 1
        self.forwarded_tokens += len(tokens)
        return self.model.forward(tokens, start, rows=rows)

    def prefill(self, tokens: np.ndarray) -> None:
        cfg, n = self.model.config, len(tokens)
        if n == 0:
            return
        self.model.ensure_capacity(n)
        # chunk so that one chunk's attention scores [n_kv, chunk, heads] stay bounded
        chunk = PREFILL_SCORE_BYTES // (4 * cfg.n_heads * n)
        chunk = max(self.block_length, min(512, chunk) // self.block_length * self.block_length)
        for start in range(0, n, chunk):
            self._forward(tokens[start:start + chunk], start)

    def block_logits(self, block: np.ndarray, start: int, rows: np.ndarray) -> np.ndarray:
        return self._forward(block, start, rows)

    def commit_block(self, block: np.ndarray, start: int) -> None:
        self._forward(block, start)


DEFAULT_TAU = 4  # until the planner chooses it ("auto")
DEFAULT_CONTEXT = 4096


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


class Engine:
    def __init__(self, path: str | os.PathLike, *, device: str = "auto", gpu_memory=None, policy: str = "tide",
                 tau="auto", threads: int | None = None, n_ctx: int | None = None, expert_slots: int | None = None,
                 popularity: dict[int, np.ndarray] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy '{policy}' (choose from {', '.join(POLICIES)})")
        self.file = ModelFile(path)
        self.config = self.file.config
        self.tokenizer = Tokenizer.from_gguf(self.file.gguf)
        ids = self.file.special_ids
        self.mask_id, self.eos_id = ids["mask"], ids["eos"]
        self.role_end_id = ids.get("role_end")
        self.defaults = self.file.decoding_defaults()
        threads = threads or os.cpu_count() or 1
        self.n_ctx = min(self.config.context_length, n_ctx or DEFAULT_CONTEXT)
        device_backend, self.device = _resolve_device(device, threads)
        self.cpu_backend = ggml.Backend.cpu(threads if device_backend is None else max(1, threads - threads // 2))
        self.plan: MemoryPlan | None = None
        self.policy_name = "cpu-only" if device_backend is None else policy
        self.tau = self.tau_source = None
        if device_backend is None:
            self.backend = self.cpu_backend
            self.model = LLaDA2Model(self.file, self.backend, self.defaults["block_length"])
        else:
            self.backend = device_backend
            if expert_slots is not None:  # a budget stated as slots per layer (studies, benchmarks)
                gpu_memory = budget_for_slots(self.file, expert_slots, self.n_ctx)
            self.plan = self._plan(device_backend, gpu_memory, policy)
            if policy == "tide" and tau == "auto":  # the cached plan of `tide plan`, else DEFAULT_TAU (and why)
                from tide_local.planner.plan import auto_placement

                auto = auto_placement(self.file, self.plan, self.device, DEFAULT_TAU)
                self.tau, self.plan, self.tau_source = auto.tau, auto.plan, auto.source
            elif policy == "tide":
                self.tau, self.tau_source = int(tau), "given"
            self.model = LLaDA2Model(self.file, device_backend, self.defaults["block_length"], on_device=True)
            self.model.offload = ExpertOffload(self.file, self.model.weights, device_backend, self.cpu_backend,
                                               self.plan, make_policy(policy, self.tau or 1, popularity))
        self.model.max_positions = self.n_ctx

    def _plan(self, device_backend, gpu_memory, policy: str) -> MemoryPlan:
        if gpu_memory is None:
            if self.device == "emulated":
                budget = plan_memory(self.file, 1 << 62, self.n_ctx, max_slots=0).fixed_bytes
                budget += self.file.expert_bytes() // 2  # room for half the experts
            else:
                free, total = self.backend_device_memory(device_backend)
                budget = free - max(512 << 20, total // 10)
        else:
            budget = parse_memory(gpu_memory)
        plan = plan_memory(self.file, budget, self.n_ctx, max_slots=0 if policy == "cpu" else None)
        if policy == "resident" and any(n < self.config.n_experts for n in plan.slots.values()):
            need = plan.fixed_bytes + plan.expert_bytes * len(plan.slots) * self.config.n_experts
            raise BudgetError(f"policy 'resident' keeps every expert on the device: it needs {need / 2**30:.2f} GiB "
                              f"(the budget is {budget / 2**30:.2f} GiB)")
        return plan

    @staticmethod
    def backend_device_memory(backend) -> tuple[int, int]:
        return backend.device.memory() if backend.device is not None else (0, 0)

    @property
    def offload(self) -> ExpertOffload | None:
        return self.model.offload

    @property
    def threads(self) -> int:
        return self.backend.n_threads

    # -- inputs ------------------------------------------------------------------------------
    def _ids(self, prompt) -> np.ndarray:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
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

    def _options(self, options: dict) -> DecodeOptions:
        merged = {"threshold": self.defaults["threshold"], "steps": self.defaults["steps"],
                  "block_length": self.defaults["block_length"]}
        merged.update({k: v for k, v in options.items() if v is not None or k in ("top_k", "top_p", "seed")})
        try:
            opts = DecodeOptions(**merged)
        except TypeError as err:
            raise TypeError(f"unknown generation option: {err}") from None
        opts.validate()
        if opts.block_length != self.model.block_length:
            raise ValueError(f"block_length must be {self.model.block_length} for this model (it was trained so)")
        return opts

    def _check_context(self, n_prompt: int, opts: DecodeOptions) -> None:
        B = opts.block_length
        needed = -(-(n_prompt + opts.max_new_tokens) // B) * B
        if needed > self.config.context_length:
            raise ValueError(
                f"a prompt of {n_prompt} tokens plus {opts.max_new_tokens} new tokens needs {needed} positions "
                f"(whole blocks of {B}); the model's context is {self.config.context_length}"
            )

    # -- the API -----------------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: one full forward at positions 0..n-1, block-causal, no cache."""
        arr = self._ids(ids)
        if len(arr) > self.config.context_length:
            raise ValueError(f"{len(arr)} tokens exceed the model's context of {self.config.context_length}")
        return self.model.forward(arr, 0, rows=np.arange(len(arr)))

    def stream(self, prompt, *, kv_cache: bool = True, stop_ids: Sequence[int] | None = None,
               **options) -> Iterator[StepEvent | BlockEvent | GenerationResult]:
        """Events as decoding goes: a StepEvent per denoising step, a BlockEvent per finished
        block, and the GenerationResult last."""
        ids = self._ids(prompt)
        opts = self._options(options)
        self._check_context(len(ids), opts)
        if kv_cache:
            block_model = CachedBlockModel(self.model, opts.block_length)
        else:
            block_model = WindowModel(lambda toks, rows: self.model.forward(toks, 0, rows=rows), opts.block_length)
        stops = [self.eos_id] if stop_ids is None else list(stop_ids)
        if self.offload is not None:
            self.offload.reset_stats()
        self.model.compute_seconds = 0.0
        start = time.perf_counter()
        for event in iter_decode(block_model, ids, opts, mask_id=self.mask_id, stop_ids=stops):
            if isinstance(event, DecodeResult):
                stats = dict(event.stats)
                stats["forwards"] = block_model.forwards
                stats["forwarded_tokens"] = block_model.forwarded_tokens
                stats["wall_seconds"] = time.perf_counter() - start
                stats["kv_cache"] = kv_cache
                stats.update(self._offload_stats(stats["wall_seconds"]))
                yield GenerationResult(event.tokens, self.tokenizer.decode(event.tokens), stats)
            else:
                yield event

    def _offload_stats(self, wall: float) -> dict:
        out = {"device": self.device, "policy": self.policy_name, "device_compute_seconds": self.model.compute_seconds}
        if self.offload is None:
            out["host_seconds"] = wall - self.model.compute_seconds
            return out
        totals = self.offload.stats.totals()
        out.update(totals)
        out["tau"] = self.tau
        out["tau_source"] = self.tau_source
        out["host_seconds"] = wall - self.model.compute_seconds - totals["wait_seconds"] - totals["upload_seconds"]
        out["per_layer"] = {layer: vars(s).copy() for layer, s in self.offload.stats.layers.items()}
        out["per_step"] = self.offload.step_log
        return out

    def record_trace(self) -> RoutingTrace:
        """Start recording the routing of every pass (for the planner and `static`); returns the trace."""
        cfg = self.config
        self.model.trace = RoutingTrace(self.file.path.name, cfg.n_experts, cfg.n_experts_used, list(cfg.moe_layers))
        return self.model.trace

    def stop_trace(self) -> RoutingTrace | None:
        trace, self.model.trace = self.model.trace, None
        return trace

    def generate(self, prompt, **options) -> GenerationResult:
        """Decode `prompt` (token ids used as is, or a string used as is: no chat template)."""
        result = None
        for event in self.stream(prompt, **options):
            result = event
        return result

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def chat_stop_ids(self) -> list[int]:
        return [self.eos_id] + ([self.role_end_id] if self.role_end_id is not None else [])

    def chat(self, messages: list[dict], **options) -> GenerationResult:
        """Render `messages` with the model's chat template and answer; stops at EOS or <|role_end|>."""
        return self.generate(self.chat_prompt(messages), stop_ids=self.chat_stop_ids(), **options)

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str | os.PathLike, device: str = "auto", gpu_memory=None, policy: str = "tide", tau="auto",
         threads: int | None = None, **options) -> Engine:
    """Open a LLaDA2 GGUF (written by `tide convert`) for generation.

    device: "auto" (an accelerator of the loaded libggml if any, else the CPU), "cpu",
      "emulated" (a second CPU backend standing in for an accelerator: a test and study
      tool with the same slot accounting and counted transfers), or a device name.
    gpu_memory: the device budget ("6GiB", "6000MiB" or bytes; None: free memory minus a reserve).
    policy: tide | swap | static | lru | cpu | resident (see tide_local.experts.policies).
    tau: TIDE's refresh interval in steps ("auto": the planner's choice; 4 until then).
    """
    return Engine(path, device=device, gpu_memory=gpu_memory, policy=policy, tau=tau, threads=threads, **options)
