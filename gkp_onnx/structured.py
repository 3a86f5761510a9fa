"""How many and which input channels of a linear layer to remove: kept counts (neurons in blocks
of ROUND_TO, heads at least one), and greedy Optimal Brain Surgeon on calibration data.

A layer y = X W (X [tokens, K] its input on the calibration data, W [K, D]) loses a set Q of its K
input channels (feed-forward neurons; attention heads: blocks of channels). With the remaining
rows refit by least squares, the output error is tr(W_Q^T (H^-1_QQ)^-1 W_Q), H = X^T X (Optimal
Brain Surgeon; structured as in ZipLM / OBC). Units are removed greedily, the cheapest first, and
after each removal W and H^-1 are updated as the refit would change them, so each next cost is
that of removing one more unit from the already compensated layer. With the covariance of X for
H (what `validate.channel_covariances` returns), the cost is the one a refit with an intercept
(the output bias absorbing the means) leaves.

The final weights are not taken from here: reconstruct_nm refits the kept rows on the inputs the
pruned model really produces.
"""

from __future__ import annotations

import math

import numpy as np

ROUND_TO = 16  # kept neurons: a multiple of this (CPU GEMM kernels work in such blocks)
DAMP = 1e-2  # H + DAMP * mean(diag H) * I: keeps H^-1 finite for dead or collinear channels
STEP_SHARE = 64  # units removed per update: 1 / STEP_SHARE of the layer's (at least one)


def obs_kept(gram: np.ndarray, weight: np.ndarray, keep: int, unit: int = 1) -> np.ndarray:
    """Indices of the `keep` units (blocks of `unit` consecutive input channels) to keep, sorted.

    gram: [K, K] (X^T X or the covariance of X); weight: [K, D] the rows those channels feed.
    """
    return obs_path(gram, weight, [keep], unit)[keep][0]


def obs_path(gram: np.ndarray, weight: np.ndarray, keeps, unit: int = 1) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each count in `keeps`: (the units kept, sorted; the weight [K, D] as OBS compensates it,
    the removed rows zero), from one greedy run down to the smallest count."""
    channels = gram.shape[0]
    units = channels // unit
    h = gram.astype(np.float64) + DAMP * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(channels)
    h_inv = np.linalg.inv(h)
    w = weight.astype(np.float64).copy()
    alive = np.ones(units, bool)
    wanted = sorted(set(keeps), reverse=True)
    per_step = max(1, units // STEP_SHARE)  # the same for every `keeps`: one count, one kept set
    index = np.arange(units)
    path = {}
    for keep in wanted:
        while alive.sum() > keep:
            live = index[alive]
            rows = (live[:, None] * unit + np.arange(unit)).reshape(-1)
            w_units = w[rows].reshape(len(live), unit, -1)
            if unit == 1:
                cost = (w_units[:, 0] ** 2).sum(axis=1) / np.diag(h_inv)[live]
            else:
                blocks = h_inv[np.ix_(rows, rows)].reshape(len(live), unit, len(live), unit)[
                    np.arange(len(live)), :, np.arange(len(live)), :]
                cost = np.einsum("uij,ujd,uid->u", np.linalg.inv(blocks), w_units, w_units)
            removed = live[np.argsort(cost, kind="stable")[:min(per_step, int(alive.sum()) - keep)]]
            cols = (removed[:, None] * unit + np.arange(unit)).reshape(-1)
            solve = np.linalg.solve(h_inv[np.ix_(cols, cols)], np.concatenate([w[cols], h_inv[cols]], axis=1))
            w -= h_inv[:, cols] @ solve[:, :w.shape[1]]
            h_inv -= h_inv[:, cols] @ solve[:, w.shape[1]:]
            w[cols] = 0.0  # exactly: the update leaves them at rounding level
            alive[removed] = False
        path[keep] = (index[alive], w.copy())
    return path


def kept_neurons(width: int, ratio: float) -> int:
    """Neurons kept of `width` at `ratio`: (1 - ratio) * width rounded up to a multiple of ROUND_TO
    (all of them when that is not less)."""
    keep = math.ceil(round((1 - ratio) * width / ROUND_TO, 9)) * ROUND_TO
    return min(width, max(ROUND_TO, keep))


def kept_units(units: int, ratio: float) -> int:
    """Heads (or key/value groups) kept of `units` at `ratio`: at least one."""
    return max(1, min(units, math.ceil(round((1 - ratio) * units, 9))))
