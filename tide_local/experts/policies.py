"""Which experts of a MoE layer live in device slots, step by step.

Each policy sees, before a layer's experts run, how many token-slots this step routes to
each expert, and answers with the uploads (slot ← expert) to make first. Everything not
resident afterwards runs on the CPU. All policies share `LayerSlots` and this interface;
none changes what is computed, only where.

- tide:     at a block's step 0 and every `tau` steps, make the resident set the top-B
            experts by routed count (the least-used residents are evicted); between
            refreshes the placement is fixed and misses run on the CPU.
- prefetch: tide whose refresh set comes from the layer's previous pass (routing known before
            the pass starts), so its uploads can overlap earlier work; misses still run, so a
            wrong guess costs time, never tokens.
- swap:     tide with tau = 1 (Mixtral-Offload: migrate every step).
- static:   a fixed set (popular experts from a trace, else ids 0..B-1), never moved (Fiddler).
- lru:      upload every needed expert that fits, evicting the least recently used
            (llama.cpp's expert cache); the rest run on the CPU.
- adaptive: tide without tau: each layer refreshes when the CPU work its misses have cost
            since its last refresh exceeds the upload cost of the set it would bring in (a
            ski-rental rule, the paper's stated future work); prices from the device profile.
- ondemand: Mixtral-Offload: every routed expert runs on the device; each miss is uploaded
            into the LRU cache of slots, nothing runs on the CPU (a pass that needs more
            experts than there are slots runs in rounds).
- cpu:      no slots: every routed expert on the CPU (llama.cpp --cpu-moe).
- resident: every expert in a slot (the upper bound).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np

POLICIES = ("tide", "prefetch", "adaptive", "swap", "static", "lru", "ondemand", "cpu", "resident")

# TIDE's refresh interval in steps when none is given and the planner has no plan for the setting.
DEFAULT_TAU = 4


class LayerSlots:
    """Residency of one MoE layer: slot → expert and expert → slot (-1 when none)."""

    def __init__(self, n_slots: int, n_experts: int):
        self.expert_of_slot = np.full(n_slots, -1, dtype=np.int64)
        self.slot_of_expert = np.full(n_experts, -1, dtype=np.int64)
        self.last_used = np.zeros(n_slots, dtype=np.int64)  # step counter, for lru

    @property
    def n_slots(self) -> int:
        return len(self.expert_of_slot)

    def assign(self, slot: int, expert: int) -> None:
        old = self.expert_of_slot[slot]
        if old >= 0:
            self.slot_of_expert[old] = -1
        self.expert_of_slot[slot] = expert
        self.slot_of_expert[expert] = slot

    def resident(self) -> np.ndarray:
        return self.expert_of_slot[self.expert_of_slot >= 0]


def _top_by_count(counts: np.ndarray, n: int, prefer: np.ndarray) -> np.ndarray:
    """Up to n experts with the most routed slots (zero counts excluded); ties favour
    experts already resident (`prefer`), then lower ids: no needless uploads."""
    order = np.lexsort((np.arange(len(counts)), ~prefer, -counts))
    chosen = order[:n]
    return chosen[counts[chosen] > 0]


def _replace(slots: LayerSlots, wanted: np.ndarray, counts: np.ndarray) -> list[tuple[int, int]]:
    """Uploads that make every expert in `wanted` resident, filling empty slots first and
    then evicting the residents outside `wanted` with the fewest routed slots, the least
    recently used first among equals."""
    wanted_mask = np.zeros(len(slots.slot_of_expert), dtype=bool)
    wanted_mask[wanted] = True
    incoming = [int(e) for e in wanted if slots.slot_of_expert[e] < 0]
    if not incoming:
        return []
    empty = np.flatnonzero(slots.expert_of_slot < 0)
    occupied = np.flatnonzero(slots.expert_of_slot >= 0)
    evictable = occupied[~wanted_mask[slots.expert_of_slot[occupied]]]
    evictable = evictable[np.lexsort((slots.last_used[evictable], counts[slots.expert_of_slot[evictable]]))]
    free = list(empty) + list(evictable)
    uploads = []
    for expert, slot in zip(incoming, free):
        slots.assign(int(slot), expert)
        uploads.append((int(slot), expert))
    return uploads


def _mark_used(slots: LayerSlots, counts: np.ndarray, clock: int) -> None:
    """Recency of the residents this pass routes to (evictions among equal counts go by it)."""
    used = slots.slot_of_expert[np.flatnonzero(counts > 0)]
    slots.last_used[used[used >= 0]] = clock


def _upload_top(slots: LayerSlots, wanted: np.ndarray, counts: np.ndarray, clock: int) -> list[tuple[int, int]]:
    """Make `wanted` resident (see `_replace`) and stamp the slots it fills with `clock`."""
    uploads = _replace(slots, wanted, counts)
    slots.last_used[[slot for slot, _ in uploads]] = clock
    return uploads


class Policy:
    name = "policy"
    device_only = False  # True: every routed expert runs on the device, in rounds if need be
    prefetches = False  # True: its uploads are known before the pass starts (they can overlap)

    def initial(self, layer: int, slots: LayerSlots) -> list[tuple[int, int]]:
        """Uploads at load time."""
        return []

    def refresh(self, slots: LayerSlots, counts: np.ndarray, step: int, clock: int) -> list[tuple[int, int]]:
        """Uploads before this step's experts run. `step` counts passes within the current
        block (0 at its first); `clock` counts every pass."""
        return []

    def prefetch(self, slots: LayerSlots, step: int, clock: int) -> list[tuple[int, int]] | None:
        """For a policy that `prefetches`: this pass's uploads, made before the pass starts (its
        `refresh` at the layer's turn then uploads nothing); None when it cannot know them yet."""
        return None


class TidePolicy(Policy):
    name = "tide"

    def __init__(self, tau: int):
        if tau < 1:
            raise ValueError(f"tau must be at least 1 (got {tau})")
        self.tau = int(tau)

    def refresh(self, slots, counts, step, clock):
        _mark_used(slots, counts, clock)
        if step % self.tau:
            return []
        return _upload_top(slots, _top_by_count(counts, slots.n_slots, slots.slot_of_expert >= 0), counts, clock)


class PrefetchPolicy(TidePolicy):
    """TIDE's refresh schedule with the set chosen from the layer's previous pass: known before
    this pass starts, so the uploads can be issued early (overlap with earlier layers is the
    accelerator's: the cost model counts it; the engine still uploads in place)."""

    name = "prefetch"
    prefetches = True

    def __init__(self, tau: int):
        super().__init__(tau)
        self._previous = weakref.WeakKeyDictionary()  # per layer (its LayerSlots): last pass's counts
        self._prefetched = weakref.WeakKeyDictionary()  # per layer: the clock of its last prefetch

    def _uploads(self, slots, known, step, clock):
        if step % self.tau:
            return []
        return _upload_top(slots, _top_by_count(known, slots.n_slots, slots.slot_of_expert >= 0), known, clock)

    def prefetch(self, slots, step, clock):
        known = self._previous.get(slots)
        if known is None:  # the first pass has nothing earlier to go by: it refreshes at its turn
            return None
        self._prefetched[slots] = clock
        return self._uploads(slots, known, step, clock)

    def refresh(self, slots, counts, step, clock):
        known = self._previous.get(slots, counts)  # the first pass has nothing earlier to go by
        self._previous[slots] = counts.copy()
        if self._prefetched.get(slots) == clock:  # done before the pass started, from the same counts
            return []
        return self._uploads(slots, known, step, clock)


class AdaptivePolicy(Policy):
    """Ski-rental per layer: renting is running misses on the CPU, buying is uploading the layer's
    top experts (what a TIDE refresh would bring in). Rent accrues per pass, in CPU miss rows:
    each missed row, plus `expert_rows` per distinct missed expert (reading its weights); buy
    when the rent since the last refresh reaches `upload_rows` per incoming expert. No tau."""

    name = "adaptive"

    def __init__(self, upload_rows: float, expert_rows: float = 0.0):
        if not (upload_rows >= 0 and expert_rows >= 0):
            raise ValueError(f"adaptive prices must be non-negative (got {upload_rows}, {expert_rows})")
        self.upload_rows, self.expert_rows = float(upload_rows), float(expert_rows)
        self._rent = weakref.WeakKeyDictionary()  # per layer (its LayerSlots): rent since the last refresh

    def refresh(self, slots, counts, step, clock):
        resident = slots.slot_of_expert >= 0
        _mark_used(slots, counts, clock)
        missed = (counts > 0) & ~resident
        rent = self._rent.get(slots, 0.0) + counts[missed].sum() + self.expert_rows * missed.sum()
        wanted = _top_by_count(counts, slots.n_slots, resident)
        incoming = int(np.count_nonzero(~resident[wanted]))
        if incoming and rent >= self.upload_rows * incoming:
            self._rent[slots] = 0.0
            return _upload_top(slots, wanted, counts, clock)
        self._rent[slots] = rent
        return []


class SwapPolicy(TidePolicy):
    name = "swap"

    def __init__(self):
        super().__init__(1)


class StaticPolicy(Policy):
    name = "static"

    def __init__(self, popularity: dict[int, np.ndarray] | None = None):
        self.popularity = popularity or {}

    def initial(self, layer, slots):
        counts = self.popularity.get(layer)
        n_experts = len(slots.slot_of_expert)
        if counts is None:
            order = np.arange(n_experts)
        else:
            order = np.lexsort((np.arange(n_experts), -np.asarray(counts)))
        uploads = []
        for slot, expert in enumerate(order[: slots.n_slots]):
            slots.assign(slot, int(expert))
            uploads.append((slot, int(expert)))
        return uploads


class LRUPolicy(Policy):
    name = "lru"

    def refresh(self, slots, counts, step, clock):
        needed = np.flatnonzero(counts > 0)
        resident = slots.slot_of_expert[needed] >= 0
        slots.last_used[slots.slot_of_expert[needed[resident]]] = clock
        missing = needed[~resident]
        missing = missing[np.lexsort((missing, -counts[missing]))]  # most used first
        uploads = []
        for expert in missing:
            # least recently used slot that this step does not need (empty slots first)
            candidates = np.flatnonzero(slots.last_used < clock)
            if not len(candidates):
                break  # every slot serves this step: the rest run on the CPU
            free = candidates[slots.expert_of_slot[candidates] < 0]
            slot = int(free[0]) if len(free) else int(candidates[np.argmin(slots.last_used[candidates])])
            slots.assign(slot, int(expert))
            slots.last_used[slot] = clock
            uploads.append((slot, int(expert)))
        return uploads


class OnDemandPolicy(LRUPolicy):
    """Mixtral-Offload's expert cache: the first round is lru's; the experts it could not fit
    come in later rounds (`next_round`), each computed on the device after its uploads."""

    name = "ondemand"
    device_only = True

    def next_round(self, slots: LayerSlots, counts: np.ndarray, clock: int) -> list[tuple[int, int]]:
        """Uploads for the next round: the most used experts still to compute (`counts`) into
        the least recently used slots; the previous round's outputs are already taken."""
        missing = np.flatnonzero(counts > 0)
        missing = missing[np.lexsort((missing, -counts[missing]))][: slots.n_slots]
        order = np.lexsort((np.arange(slots.n_slots), slots.last_used))
        uploads = []
        for slot, expert in zip(order, missing):
            slots.assign(int(slot), int(expert))
            slots.last_used[slot] = clock
            uploads.append((int(slot), int(expert)))
        return uploads


class ResidentPolicy(StaticPolicy):
    name = "resident"


class CpuPolicy(Policy):
    name = "cpu"


@dataclass
class LayerRefresh:
    """One MoE layer on one pass: the uploads its policy made first, then where each of the
    routing's (token, choice) assignments runs. The engine (``HybridExperts.place``) and the
    trace replays count a placement from this one object, so their counts agree."""

    counts: np.ndarray  # int [E] token-slots routed to each expert
    uploads: list[tuple[int, int]]  # (slot, expert), made before the layer's experts run
    slot_ids: np.ndarray  # int [T, K] slot of each assignment, -1 where it misses (runs on the CPU)
    # device-only policies: further rounds, each (uploads, slot ids of the assignments it computes,
    # -1 elsewhere), run after the first; `slot_ids` then holds the first round's
    rounds: list[tuple[list[tuple[int, int]], np.ndarray]] = field(default_factory=list)

    @property
    def hit(self) -> np.ndarray:
        """Assignments of the first round on the device."""
        return self.slot_ids >= 0

    @property
    def n_hits(self) -> int:
        """Assignments computed on the device, every round."""
        return int(self.hit.sum()) + sum(int((ids >= 0).sum()) for _, ids in self.rounds)

    @property
    def n_misses(self) -> int:
        return self.slot_ids.size - self.n_hits

    def tally(self) -> tuple[int, int, int]:
        """(hits, misses, uploads): a layer's entry in the engine's per-step statistics."""
        hits = self.n_hits
        return hits, self.slot_ids.size - hits, len(self.uploads) + sum(len(u) for u, _ in self.rounds)


def refresh_layer(policy: Policy, slots: LayerSlots, experts: np.ndarray, step: int, clock: int, *,
                  refresh: bool = True) -> LayerRefresh:
    """Let `policy` refresh `slots` for a layer routed to `experts` (int [T, K]) and say which
    assignments hit. `step` is the decoder's step within the block, `clock` counts every pass;
    `refresh` False (a block's commit pass) keeps the residency as it is."""
    counts = np.bincount(experts.ravel(), minlength=len(slots.slot_of_expert))
    refresh = refresh or policy.device_only  # a device-only policy has nowhere else to run a miss
    uploads = policy.refresh(slots, counts, step, clock) if slots.n_slots and refresh else []
    result = LayerRefresh(counts, uploads, slots.slot_of_expert[experts])
    if policy.device_only and slots.n_slots:
        done = result.hit
        while not done.all():
            ups = policy.next_round(slots, np.bincount(experts[~done], minlength=len(counts)), clock)
            ids = np.where(done, -1, slots.slot_of_expert[experts])
            result.rounds.append((ups, ids))
            done = done | (ids >= 0)
    return result


def make_policy(name: str, tau: int = DEFAULT_TAU, popularity: dict[int, np.ndarray] | None = None,
                prices: tuple[float, float] | None = None) -> Policy:
    """`prices`: adaptive's (upload_rows, expert_rows), see AdaptivePolicy."""
    if name == "tide":
        return TidePolicy(tau)
    if name == "prefetch":
        return PrefetchPolicy(tau)
    if name == "adaptive":
        if prices is None:
            raise ValueError("the adaptive policy needs its prices (upload_rows, expert_rows)")
        return AdaptivePolicy(*prices)
    if name == "swap":
        return SwapPolicy()
    if name == "static":
        return StaticPolicy(popularity)
    if name == "lru":
        return LRUPolicy()
    if name == "ondemand":
        return OnDemandPolicy()
    if name == "cpu":
        return CpuPolicy()
    if name == "resident":
        return ResidentPolicy()
    raise ValueError(f"unknown policy '{name}' (choose from {', '.join(POLICIES)})")
