"""Which input channels of a linear layer to remove: greedy Optimal Brain Surgeon on calibration data.

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

import numpy as np

DAMP = 1e-2  # H + DAMP * mean(diag H) * I: keeps H^-1 finite for dead or collinear channels
STEPS = 32  # updates per layer at most: units removed per update = ceil(removed / STEPS)


def obs_kept(gram: np.ndarray, weight: np.ndarray, keep: int, unit: int = 1) -> np.ndarray:
    """Indices of the `keep` units (blocks of `unit` consecutive input channels) to keep, sorted.

    gram: [K, K] (X^T X or the covariance of X); weight: [K, D] the rows those channels feed.
    """
    channels = gram.shape[0]
    units = channels // unit
    h = gram.astype(np.float64) + DAMP * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(channels)
    h_inv = np.linalg.inv(h)
    w = weight.astype(np.float64).copy()
    alive = np.ones(units, bool)
    per_step = max(1, -(-(units - keep) // STEPS))
    index = np.arange(units)
    while alive.sum() > keep:
        live = index[alive]
        rows = (live[:, None] * unit + np.arange(unit)).reshape(-1)
        blocks = h_inv[np.ix_(rows, rows)].reshape(len(live), unit, len(live), unit)[np.arange(len(live)), :,
                                                                                     np.arange(len(live)), :]
        w_units = w[rows].reshape(len(live), unit, -1)
        cost = np.einsum("uij,ujd,uid->u", np.linalg.inv(blocks), w_units, w_units)
        removed = live[np.argsort(cost, kind="stable")[:min(per_step, int(alive.sum()) - keep)]]
        cols = (removed[:, None] * unit + np.arange(unit)).reshape(-1)
        solve = np.linalg.solve(h_inv[np.ix_(cols, cols)], np.concatenate([w[cols], h_inv[cols]], axis=1))
        w -= h_inv[:, cols] @ solve[:, :w.shape[1]]
        h_inv -= h_inv[:, cols] @ solve[:, w.shape[1]:]
        alive[removed] = False
    return index[alive]
