"""Token choice, confidence and the commit rule of block diffusion (pure numpy).

Everything here works on the logits rows of the masked positions of one block, ``[n, vocab]``,
vectorised over rows; nothing loops over the vocabulary in Python.

Greedy (temperature 0): the token is the argmax of the full row (a padded vocabulary row the
tokenizer does not know included) and its confidence is the softmax probability of that argmax,
``1 / sum(exp(logits - max))``. top-k / top-p do not apply at temperature 0: neither can change
the argmax, and the confidence is always taken over the unfiltered row.

Sampling (temperature > 0), as the LLaDA2.0 reference: scale by ``1/temperature``, keep the
top-k logits (ties with the k-th kept), keep the smallest set of most probable tokens whose
probability mass exceeds top-p (the token that crosses top-p is kept, so at least one survives),
softmax, one draw per row from a ``numpy.random.Generator``. The confidence is the drawn token's
probability under that filtered distribution.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "transfer_schedule",
    "greedy",
    "filter_logits",
    "sample",
    "choose_tokens",
    "select_commits",
]

# First candidate-set size tried by the top-p filter before falling back to larger ones.
_TOP_P_FIRST = 256


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Per-step commit quota: ``block_length`` split over ``steps``, the first ``block_length % steps``
    steps getting one more (``[1] * 32`` for the defaults)."""
    if block_length < 1 or steps < 1:
        raise ValueError(f"block_length and steps must be >= 1 (got {block_length}, {steps})")
    base, extra = divmod(block_length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def _as_rows(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {logits.shape}")
    if logits.dtype != np.float32 and logits.dtype != np.float64:
        logits = logits.astype(np.float32)
    return logits


def greedy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax token per row (lowest id on ties) and its softmax probability (float64)."""
    logits = _as_rows(logits)
    tokens = np.argmax(logits, axis=1)
    top = np.take_along_axis(logits, tokens[:, None], axis=1)
    # exp in the logits' precision, summed in float64: the argmax term is exactly 1.
    denom = np.exp(logits - top).sum(axis=1, dtype=np.float64)
    return tokens.astype(np.int64), 1.0 / denom


def _softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def _top_p_keep(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean keep-mask per row: the most probable tokens, in descending order, up to and including
    the one whose cumulative probability first exceeds ``top_p``.

    Rows whose top token alone exceeds ``top_p`` keep just it; the others sort only their
    ``m`` most probable tokens (``argpartition``), doubling ``m`` for rows not resolved yet."""
    n, vocab = probs.shape
    keep = np.zeros((n, vocab), dtype=bool)
    top = np.argmax(probs, axis=1)
    single = probs[np.arange(n), top] > top_p
    keep[np.flatnonzero(single), top[single]] = True
    pending = np.flatnonzero(~single)
    m = min(_TOP_P_FIRST, vocab)
    while pending.size:
        rows = probs[pending]
        if m < vocab:
            cand = np.argpartition(-rows, m - 1, axis=1)[:, :m]
        else:
            cand = np.broadcast_to(np.arange(vocab), (pending.size, vocab))
        cand_p = np.take_along_axis(rows, cand, axis=1)
        order = np.argsort(-cand_p, axis=1, kind="stable")
        cand = np.take_along_axis(cand, order, axis=1)
        cum = np.cumsum(np.take_along_axis(cand_p, order, axis=1), axis=1)
        crossed = cum > top_p
        done = crossed[:, -1] | (m >= vocab)
        # number kept = index of the first crossing + 1 (everything if it never crosses)
        count = np.where(crossed.any(axis=1), np.argmax(crossed, axis=1) + 1, m)
        rows_done = np.flatnonzero(done)
        r, j = np.nonzero(np.arange(cand.shape[1])[None, :] < count[rows_done, None])
        keep[pending[rows_done[r]], cand[rows_done[r], j]] = True
        pending = pending[~done]
        m = min(2 * m, vocab)
    return keep


def filter_logits(
    logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """Temperature, then top-k, then top-p; filtered-out logits become -inf. Returns float64."""
    x = _as_rows(logits).astype(np.float64)
    if temperature != 1.0:
        x /= temperature
    vocab = x.shape[1]
    if top_k is not None and top_k < vocab:
        kth = np.partition(x, vocab - top_k, axis=1)[:, vocab - top_k, None]
        x[x < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        x[~_top_p_keep(_softmax64(x), top_p)] = -np.inf
    return x


def sample(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One draw per row from the filtered distribution; returns (tokens, their probabilities)."""
    probs = _softmax64(filter_logits(logits, temperature, top_k, top_p))
    cum = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0]) * cum[:, -1]
    # first index whose cumulative mass exceeds u: never a zero-probability token
    tokens = np.minimum(np.argmax(cum > u[:, None], axis=1), probs.shape[1] - 1)
    return tokens.astype(np.int64), probs[np.arange(probs.shape[0]), tokens]


def choose_tokens(
    logits: np.ndarray,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token and confidence per row: :func:`greedy` at temperature 0, else :func:`sample`."""
    if temperature == 0:
        return greedy(logits)
    if rng is None:
        raise ValueError("sampling (temperature > 0) needs a numpy Generator")
    return sample(logits, rng, temperature, top_k, top_p)


def select_commits(confidence: np.ndarray, threshold: float, quota: int) -> np.ndarray:
    """Which candidates to commit this step, as indices into ``confidence`` (ascending).

    ``confidence`` holds the masked positions of a block in position order. Every candidate with
    confidence strictly above ``threshold`` if there are at least ``quota`` of them; else the
    ``min(quota, len)`` most confident (ties: lowest position first).
    """
    confidence = np.asarray(confidence)
    above = np.flatnonzero(confidence > threshold)
    if above.size >= quota:
        return above
    k = min(quota, confidence.size)
    return np.sort(np.argsort(-confidence, kind="stable")[:k])
