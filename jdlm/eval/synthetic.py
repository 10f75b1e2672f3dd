"""Exact metrics of samples from a synthetic language whose probabilities q are known.

* SER, the sequence error rate: the fraction of samples with a transition of probability zero
  (Feng et al. 2025; reference/MODELS.md §5.2).
* The per-token NLL under the true distribution, -(1/L) log q(x), averaged over samples: over
  the legal samples only (it is infinite on the others), and over all samples under the smoothed
  q_eps = (1 - eps) q + eps / |V|, applied to every conditional factor, so it stays finite.
  The optimum is the language's entropy per token, reported alongside.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jdlm.errors import JdlmError
from jdlm.synthetic import NGramLanguage


@dataclasses.dataclass(frozen=True)
class SyntheticMetrics:
    ser: float
    nll_legal: float | None  # None when no sample is legal
    nll_smoothed: float
    eps: float
    entropy_per_token: float  # what exact sampling achieves on average
    num_samples: int
    num_legal: int
    length: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def smoothed_token_log_probs(lang: NGramLanguage, seqs, eps: float) -> np.ndarray:
    """(n, length) log q_eps of each token given its past; the initial state is smoothed over
    the |V|^(order-1) states and, like `token_log_probs`, spread evenly over its tokens."""
    if not 0 < eps <= 1:
        raise JdlmError(f"eps={eps} must lie in (0, 1]")
    logq = lang.token_log_probs(seqs)
    k = lang.order - 1
    init = np.log((1 - eps) * np.exp(logq[:, :k].sum(axis=1)) + eps / lang.num_states)
    steps = np.log((1 - eps) * np.exp(logq[:, k:]) + eps / lang.vocab_size)
    return np.concatenate([np.repeat((init / k)[:, None], k, axis=1), steps], axis=1)


def synthetic_metrics(lang: NGramLanguage, samples, eps: float = 1e-3) -> SyntheticMetrics:
    """SER and true-distribution NLLs of `samples`, an (n, length) array of token ids."""
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise JdlmError(f"samples must be a non-empty (n, length) array, got {samples.shape}")
    length = samples.shape[1]
    logq = lang.log_prob(samples)
    legal = np.isfinite(logq)
    smoothed = smoothed_token_log_probs(lang, samples, eps).sum(axis=1)
    return SyntheticMetrics(
        ser=float(1 - legal.mean()),
        nll_legal=float(-logq[legal].mean() / length) if legal.any() else None,
        nll_smoothed=float(-smoothed.mean() / length),
        eps=eps,
        entropy_per_token=lang.entropy_per_token(length),
        num_samples=len(samples), num_legal=int(legal.sum()), length=length)
