"""The LLaDA2.0 forward as ggml graphs, with a block KV cache.

Reads like the model (spec §3): embedding; per layer RMSNorm, fused QKV, per-head
QK-norm, partial NeoX RoPE, GQA attention under the block-causal mask, output
projection, residual; FFN dense (first layers) or MoE (router → host selection →
experts via mul_mat_id, plus the shared expert); final norm; LM head on the rows
that need logits.

A forward over T tokens at absolute positions [start, start+T) is one *pass*. It
attends to the cache [0, start) and to itself, and writes its own K/V into the cache
at [start, start+T) as it goes (a block's slots are scratch until the block is final;
its last write is the one with its final tokens). Because the router's choice is made
on the host, a pass is a chain of graphs cut at each MoE layer's routing:

    graph 0:  embed → dense layers → attention of the first MoE layer → router logits
    graph k:  experts of MoE layer k-1 → attention of MoE layer k → router logits
    last:     experts of the last layer → final norm
    LM head:  final hidden rows → logits, built per row count

Activations cross graphs through small persistent tensors (ping-pong pairs). Graphs
are built once per (T, start) and reused for every denoising step of a block.

Where a MoE layer's routed experts run is the business of the experts executor given at
construction (``model/experts.py``): all on this backend, or split between device slots
and the CPU (``tide_local.experts.offload``). The forward only asks it for the per-choice
outputs and runs it with the routing. Time goes to a ``PhaseTimer`` (``model/timing.py``).
The embedding rows are looked up on the host: the table stays in the mapped file.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tide_local import ggml
from tide_local.architecture import LLaDA2Config
from tide_local.diffusion.blockmodel import PassInfo
from tide_local.model.experts import ExpertsExecutor, ResidentExperts, routed_experts  # noqa: F401 (re-export)
from tide_local.model.router import Routing, route
from tide_local.model.timing import PhaseTimer
from tide_local.model.weights import LayerWeights, Weights

F32, F16, I32 = int(ggml.GGMLType.F32), int(ggml.GGMLType.F16), int(ggml.GGMLType.I32)
CACHE_GRANULE = 512  # KV cache capacity grows in steps of this many positions


def block_causal_mask(start: int, n_tokens: int, block_length: int) -> np.ndarray:
    """Additive mask [n_tokens, start + n_tokens]: query i (position start+i) sees key j
    iff block(j) <= block(start+i)."""
    q_block = (start + np.arange(n_tokens)) // block_length
    k_block = np.arange(start + n_tokens) // block_length
    return np.where(k_block[None, :] <= q_block[:, None], 0.0, -np.inf).astype(np.float32)


def attention_mask(start: int, n_tokens: int, block_length: int, group: int) -> np.ndarray:
    """The block-causal mask laid out for `attention_core`: F16 [n_tokens·group, start+n_tokens],
    row r + group·i for query i and the r-th query head of a KV group (F16 holds 0 and -inf
    exactly, at half the memory)."""
    return np.repeat(block_causal_mask(start, n_tokens, block_length), group, axis=0).astype(np.float16)


def attention_core(ctx: ggml.Context, q, k_cache, v_cache, capacity: int, n_kv: int, mask):
    """softmax(q·Kᵀ/√hd + mask)·V over cache positions [0, n_kv) → [hd·nh, T].

    q: [hd, nh, T]; k_cache: [hd, nkv, capacity]; v_cache stored transposed, [capacity, hd·nkv];
    mask from `attention_mask`. The G = nh/nkv query heads sharing a KV head (heads g·G … g·G+G-1)
    become G·T rows of one matmul per KV head, so each key and value row is read once per G·T
    queries rather than T (1.3–1.8× faster on the CPU than broadcasting over the query heads)."""
    hd, nh, T = q.ne[0], q.ne[1], q.ne[2]
    nkv = k_cache.ne[1]
    G = nh // nkv
    keys = ctx.permute(ctx.view(k_cache, (hd, nkv, n_kv), (hd * 4, hd * nkv * 4), 0), 0, 2, 1, 3)  # [hd, n_kv, nkv]
    values = ctx.view(v_cache, (n_kv, hd, nkv), (capacity * 4, capacity * hd * 4), 0)  # [n_kv, hd, nkv]
    grouped = ctx.view(q, (hd, G, nkv, T), (hd * 4, hd * G * 4, hd * nh * 4), 0)  # [hd, G, nkv, T]
    grouped = ctx.reshape(ctx.cont(ctx.permute(grouped, 0, 1, 3, 2)), hd, G * T, nkv)  # rows r + G·t
    probs = ctx.soft_max(ctx.mul_mat(keys, grouped), mask, scale=1.0 / math.sqrt(hd))  # [n_kv, G·T, nkv]
    out = ctx.mul_mat(values, probs)  # [hd, G·T, nkv]
    out = ctx.view(out, (hd, G, T, nkv), (hd * 4, hd * G * 4, hd * G * T * 4), 0)
    return ctx.reshape(ctx.cont(ctx.permute(out, 0, 1, 3, 2)), hd * nh, T)  # heads in order


class KVCache:
    """One sequence's cache: per layer K [head_dim, n_kv, capacity] and V stored transposed
    [capacity, head_dim·n_kv], f32."""

    _serials = itertools.count()

    def __init__(self, backend: ggml.Backend, cfg: LLaDA2Config, capacity: int):
        self.capacity = capacity
        self.serial = next(self._serials)  # names the cache in pass keys (an id() could be reused)
        self.context = ggml.Context(max_tensors=2 * cfg.n_layers + 2)
        self.k = [self.context.new_tensor(F32, ne=(cfg.head_dim, cfg.n_kv_heads, capacity)) for _ in range(cfg.n_layers)]
        self.v = [self.context.new_tensor(F32, ne=(capacity, cfg.head_dim * cfg.n_kv_heads)) for _ in range(cfg.n_layers)]
        self.buffer = backend.alloc_tensors(self.context)
        self.buffer.clear(0)

    @property
    def nbytes(self) -> int:
        return self.buffer.size


@dataclass(frozen=True)
class Span:
    """One sequence's rows in a pass: `n_tokens` tokens at positions [start, start+n_tokens) of
    `cache`. A pass over several spans is a batch: every matmul and the MoE run over all their
    rows, attention runs per span over its own cache."""

    cache: KVCache
    start: int
    n_tokens: int

    @property
    def key(self) -> tuple[int, int, int]:
        return self.cache.serial, self.start, self.n_tokens


@dataclass
class _Segment:
    graph: ggml.Graph
    moe_layer: int | None  # the MoE layer whose experts this graph runs first (None for graph 0)
    routed_layer: int | None = None  # the MoE layer whose router logits this graph ends with
    router_logits: ggml.Tensor | None = None  # read by the host to route `routed_layer`


class Pass:
    """The graphs of one forward shape: the spans' tokens, one after another (one span: T tokens
    at positions [start, start+T) of the model's cache)."""

    def __init__(self, model: "LLaDA2Model", spans: tuple[Span, ...]):
        self.model, self.spans = model, spans
        self.n_tokens = T = sum(span.n_tokens for span in spans)
        self.start = spans[0].start if len(spans) == 1 else -1  # -1: a batch of sequences
        cfg = model.config
        self.ctx = ctx = ggml.Context(max_tensors=64 + (128 + 32 * len(spans)) * cfg.n_layers)
        # persistent inputs and the activations that cross graphs
        self.embeddings = ctx.new_tensor(F32, ne=(cfg.hidden_size, T), name="embeddings")
        self.positions = ctx.new_tensor(I32, ne=(T,), name="positions")
        group = cfg.n_heads // cfg.n_kv_heads
        self.masks = [ctx.new_tensor(F16, ne=(span.start + span.n_tokens, group * span.n_tokens), name="mask")
                      for span in spans]
        self.h = [ctx.new_tensor(F32, ne=(cfg.hidden_size, T)) for _ in range(2)]
        self.x = [ctx.new_tensor(F32, ne=(cfg.hidden_size, T)) for _ in range(2)]
        self.final = ctx.new_tensor(F32, ne=(cfg.hidden_size, T), name="final")
        self.experts = model.experts.for_pass(ctx, T, model.timer)  # its persistent tensors join the state
        self.state_buffer = model.backend.alloc_tensors(ctx)
        self.positions.set(np.concatenate([np.arange(s.start, s.start + s.n_tokens, dtype=np.int32) for s in spans]))
        for span, mask in zip(spans, self.masks):
            mask.set(attention_mask(span.start, span.n_tokens, model.block_length, group))
        self._state_slot: dict[int, int] = {}  # MoE layer → which state pair holds its x
        self.segments = self._build()
        self._lm_heads: dict[int, tuple[ggml.Graph, ggml.Tensor, ggml.Tensor]] = {}
        self.graphs = [seg.graph for seg in self.segments] + list(self.experts.graphs)
        # the largest LM head is reserved with the segments so smaller ones never grow the buffer
        self._lm_head(T, bind=False)
        model.bind(self.graphs)

    # -- graph construction ---------------------------------------------------------------
    def _build(self) -> list[_Segment]:
        m, cfg, ctx = self.model, self.model.config, self.ctx
        moe = list(cfg.moe_layers)
        segments = []
        # graph 0: embedding, dense layers, attention (+ router) of the first MoE layer
        outputs: list[ggml.Tensor] = []
        h = self.embeddings
        for i in range(cfg.n_dense_layers):
            h = self._attention(h, i, outputs)
            h = ctx.add(h, self._dense_ffn(self._norm(h, m.weights.layers[i].ffn_norm), m.weights.layers[i]))
        if not moe:  # a model without MoE layers: the whole forward is one graph
            outputs.append(ctx.cpy(self._final_norm(h), self.final))
            return [_Segment(ctx.build_graph(*outputs), None)]
        segments.append(self._attention_segment(h, moe[0], outputs, slot=0, moe_layer=None))
        # graph k: experts of moe[k-1], then attention of moe[k]
        for k in range(1, len(moe)):
            outputs = []
            h = self._moe_ffn_from_state(moe[k - 1], slot=(k - 1) % 2)
            segments.append(self._attention_segment(h, moe[k], outputs, slot=k % 2, moe_layer=moe[k - 1]))
        h = self._moe_ffn_from_state(moe[-1], slot=(len(moe) - 1) % 2)
        final = ctx.cpy(self._final_norm(h), self.final)
        segments.append(_Segment(ctx.build_graph(final), moe[-1]))
        return segments

    def _attention_segment(self, h, layer: int, outputs: list, slot: int, moe_layer: int | None) -> _Segment:
        """attention of `layer` on h, then its FFN input and router logits; state goes to `slot`."""
        ctx, lw = self.ctx, self.model.weights.layers[layer]
        self._state_slot[layer] = slot
        h = self._attention(h, layer, outputs)
        x = self._norm(h, lw.ffn_norm)
        logits = ctx.mul_mat(lw.router, x)  # [n_experts, T], f32 router (weights stored f32)
        outputs += [ctx.cpy(h, self.h[slot]), ctx.cpy(x, self.x[slot]), logits]
        return _Segment(ctx.build_graph(*outputs), moe_layer, layer, logits)

    def _norm(self, x, weight):
        return self.ctx.mul(self.ctx.rms_norm(x, self.model.config.rms_eps), weight)

    def _final_norm(self, h):
        return self._norm(h, self.model.weights.output_norm)

    def _attention(self, h, layer: int, outputs: list):
        """h + attention(RMSNorm(h)); appends the K/V cache writes to `outputs` (they must run first)."""
        ctx, cfg, m = self.ctx, self.model.config, self.model
        lw: LayerWeights = m.weights.layers[layer]
        T, hd, nh, nkv = self.n_tokens, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        x = self._norm(h, lw.attn_norm)
        qkv = ctx.mul_mat(lw.attn_qkv, x)  # [(nh + 2 nkv)·hd, T]: Q heads, K heads, V heads
        row = qkv.nb[1]
        q = ctx.cont(ctx.view(qkv, (hd, nh, T), (hd * 4, row), 0))
        k = ctx.cont(ctx.view(qkv, (hd, nkv, T), (hd * 4, row), nh * hd * 4))
        v = ctx.view(qkv, (hd * nkv, T), (row,), (nh + nkv) * hd * 4)
        # QK-norm per head, before RoPE; partial NeoX RoPE on the first rotary_dim dims
        q = ctx.mul(ctx.rms_norm(q, cfg.rms_eps), lw.attn_q_norm)
        k = ctx.mul(ctx.rms_norm(k, cfg.rms_eps), lw.attn_k_norm)
        q = ctx.rope(q, self.positions, cfg.rotary_dim, neox=True, freq_base=cfg.rope_theta, n_ctx_orig=cfg.context_length)
        k = ctx.rope(k, self.positions, cfg.rotary_dim, neox=True, freq_base=cfg.rope_theta, n_ctx_orig=cfg.context_length)
        out, row0 = None, 0
        for span, mask in zip(self.spans, self.masks):  # per sequence: its K/V into its cache, its attention
            n, start, cache = span.n_tokens, span.start, span.cache
            if len(self.spans) > 1:
                q_s = ctx.view(q, (hd, nh, n), (q.nb[1], q.nb[2]), row0 * q.nb[2])
                k_s = ctx.view(k, (hd, nkv, n), (k.nb[1], k.nb[2]), row0 * k.nb[2])
                v_s = ctx.view(qkv, (hd * nkv, n), (row,), (nh + nkv) * hd * 4 + row0 * row)
            else:
                q_s, k_s, v_s = q, k, v
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            k_slot = ctx.view(k_cache, (hd, nkv, n), (hd * 4, hd * nkv * 4), start * hd * nkv * 4)
            v_slot = ctx.view(v_cache, (n, hd * nkv), (cache.capacity * 4,), start * 4)
            outputs.append(ctx.cpy(k_s, k_slot))
            outputs.append(ctx.cpy(ctx.transpose(v_s), v_slot))
            attended = attention_core(ctx, q_s, k_cache, v_cache, cache.capacity, start + n, mask)
            out = attended if out is None else ctx.concat(out, attended, 1)
            row0 += n
        return ctx.add(h, ctx.mul_mat(lw.attn_output, out))

    def _dense_ffn(self, x, lw: LayerWeights):
        ctx = self.ctx
        return ctx.mul_mat(lw.ffn_down, ctx.mul(ctx.silu(ctx.mul_mat(lw.ffn_gate, x)), ctx.mul_mat(lw.ffn_up, x)))

    def _moe_ffn_from_state(self, layer: int, slot: int):
        """h + Σ_k w_k·expert_k(x) + shared(x), reading h and x from the state of `slot`."""
        ctx, cfg, lw = self.ctx, self.model.config, self.model.weights.layers[layer]
        T, K = self.n_tokens, cfg.n_experts_used
        h, x = self.h[slot], self.x[slot]
        per_slot = self.experts.output(layer, x)  # [H, K, T]
        # sum over the chosen experts, in choice order (the same order for every placement)
        out = ctx.view(per_slot, (cfg.hidden_size, T), (per_slot.nb[2],), 0)
        for j in range(1, K):
            out = ctx.add(out, ctx.view(per_slot, (cfg.hidden_size, T), (per_slot.nb[2],), j * per_slot.nb[1]))
        if lw.shared_gate is not None:
            shared = ctx.mul(ctx.silu(ctx.mul_mat(lw.shared_gate, x)), ctx.mul_mat(lw.shared_up, x))
            out = ctx.add(out, ctx.mul_mat(lw.shared_down, shared))
        return ctx.add(h, out)

    def _lm_head(self, n_rows: int, bind: bool = True):
        if n_rows not in self._lm_heads:
            with self.model.timer.phase("build_lm_head"):
                self._build_lm_head(n_rows, bind)
        return self._lm_heads[n_rows]

    def _build_lm_head(self, n_rows: int, bind: bool) -> None:
        ctx = ggml.Context(max_tensors=8)
        rows = ctx.new_tensor(I32, ne=(n_rows,), name="rows", input=True)
        logits = ctx.mul_mat(self.model.weights.output, ctx.get_rows(self.final, rows))
        graph = ctx.build_graph(logits)
        self._lm_heads[n_rows] = (graph, rows, logits)
        self.graphs.append(graph)
        if bind:
            self.model.bind([graph])

    # -- running ----------------------------------------------------------------------------
    def run(self, tokens: np.ndarray, rows: np.ndarray | None, info: PassInfo) -> np.ndarray | None:
        """Forward `tokens`; returns logits [len(rows), vocab] (None when rows is None)."""
        m, cfg, timer = self.model, self.model.config, self.model.timer
        with timer.phase("embed"):
            self.embeddings.set(m.weights.embed(tokens))
        m.experts.begin_pass(self.start, self.n_tokens, info)
        if m.routing_observer is not None:
            m.routing_observer.begin_pass(self.start, self.n_tokens, rows is not None, info)
        routing = m.last_routing = {}
        for seg in self.segments:
            if seg.moe_layer is not None:
                with timer.phase("experts"):
                    self.experts.run(seg.moe_layer, self.x[self._state_slot[seg.moe_layer]], routing[seg.moe_layer])
            with timer.phase("compute_layers"):
                m.backend.compute(seg.graph)
            if seg.router_logits is not None:
                layer = seg.routed_layer
                with timer.phase("route"):
                    routing[layer] = r = route(
                        seg.router_logits.get().reshape(self.n_tokens, cfg.n_experts), m.weights.layers[layer].expert_bias,
                        n_used=cfg.n_experts_used, n_groups=cfg.n_groups, n_groups_used=cfg.n_groups_used,
                        scale=cfg.routed_scaling_factor)
                if m.routing_observer is not None:
                    m.routing_observer.record(layer, r.experts)
        if rows is None:
            return None
        rows = np.asarray(rows, dtype=np.int32)
        graph, rows_t, logits = self._lm_head(len(rows))
        with timer.phase("compute_lm_head"):
            m.backend.compute(graph, {rows_t: rows})
        with timer.phase("logits"):
            return logits.get()


class RoutingObserver(Protocol):
    """Sees every pass's routing (a RoutingTrace while one is recorded)."""

    def begin_pass(self, start: int, n_tokens: int, logits: bool, info: PassInfo) -> None: ...

    def record(self, layer: int, experts: np.ndarray) -> None: ...


class LLaDA2Model:
    """The forward of one loaded model on one backend, with its KV cache and pass cache."""

    def __init__(self, model_file, weights: Weights, backend: ggml.Backend, *, block_length: int = 32,
                 experts: ExpertsExecutor | None = None, max_positions: int | None = None,
                 timer: PhaseTimer | None = None):
        """`weights`: on `backend` (device runs) or the mapped file (CPU runs); `experts`: where the
        routed experts run (default: all with the weights); `max_positions`: the KV cache's limit
        (default: the model's context); `timer`: where the phases' time goes."""
        self.file = model_file
        self.config: LLaDA2Config = model_file.config
        self.backend = backend
        self.block_length = block_length
        self.weights = weights
        self.experts = experts if experts is not None else ResidentExperts(weights, self.config)
        self.max_positions = max_positions or self.config.context_length
        self.timer = timer if timer is not None else PhaseTimer()
        self.routing_observer: RoutingObserver | None = None  # set with observe_routing
        self.last_routing: dict[int, Routing] = {}  # per MoE layer, the last pass's (benchmarks read it)
        self.allocator = ggml.GraphAllocator(backend)
        self.cache: KVCache | None = None
        self._passes: dict[tuple[int, int], Pass] = {}

    def observe_routing(self, observer: RoutingObserver | None) -> None:
        """Show every following pass's routing to `observer` (None: stop)."""
        self.routing_observer = observer

    def bind(self, graphs: list[ggml.Graph]) -> None:
        """Bind graphs in the shared compute buffer; passes bound earlier are dropped if it grew."""
        if self.allocator.bind(graphs):
            current = {id(g) for g in graphs}
            self._passes = {k: p for k, p in self._passes.items() if any(id(g) in current for g in p.graphs)}

    def ensure_capacity(self, n_positions: int) -> None:
        """The model's own cache (the one `forward` uses) holds at least `n_positions`."""
        if self.cache is None or self.cache.capacity < n_positions:
            self.drop_cache()
            self.cache = self.new_cache(n_positions)

    def drop_cache(self) -> None:
        """Free the model's own cache (a batch of sequences uses caches of its own)."""
        if self.cache is not None:
            self.release_cache(self.cache)
            self.cache = None

    def new_cache(self, n_positions: int) -> KVCache:
        """A KV cache for one sequence of up to `n_positions` (rounded up to whole granules)."""
        if n_positions > self.max_positions:
            raise ValueError(f"{n_positions} positions exceed the context of {self.max_positions}")
        return KVCache(self.backend, self.config, min(self.max_positions, -(-n_positions // CACHE_GRANULE) * CACHE_GRANULE))

    def release_cache(self, cache: KVCache) -> None:
        """Forget the passes that hold views of `cache`, so its memory goes with its last reference."""
        self._passes = {k: p for k, p in self._passes.items() if all(s.cache is not cache for s in p.spans)}

    def forward(self, tokens, start: int, rows=None, info: PassInfo | None = None) -> np.ndarray | None:
        """One pass: tokens at positions [start, start+T), attending to the cache [0, start).
        Writes their K/V into the cache; returns logits of `rows` (indices into tokens).
        `info`: what the pass is for (the decoder's block and step; default a plain forward)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        self.ensure_capacity(start + len(tokens))
        return self.forward_spans([Span(self.cache, start, len(tokens))], tokens, rows, info)

    def forward_spans(self, spans: list[Span], tokens, rows=None, info: PassInfo | None = None) -> np.ndarray | None:
        """One pass over several sequences: `tokens` holds the spans' tokens one after another
        (each span's positions in its own cache), `rows` indexes into them. Each span attends to
        its own cache only; its rows get the values they would get in a pass of their own on
        the CPU (matmuls are per row, except K-quants' tiled kernel: see README, exactness)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        key = tuple(span.key for span in spans)
        p = self._passes.get(key)
        if p is None:
            if len(self._passes) > 8:
                self._passes.clear()
            with self.timer.phase("build_pass"):
                p = self._passes[key] = Pass(self, tuple(spans))
        return p.run(tokens, rows, info or PassInfo.plain())
