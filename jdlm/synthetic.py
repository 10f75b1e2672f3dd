"""Synthetic languages whose probabilities are known exactly.

A sparse random n-gram chain: every context of n-1 tokens allows only `support` next tokens,
with Dirichlet weights. Exact sequence probabilities make the sequence error rate (a sample
with an impossible transition) and the true-distribution NLL measurable, and the exact entropy
of a length-L sequence is the floor that any likelihood bound of a trained model sits above.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jdlm.errors import JdlmError


@dataclasses.dataclass(frozen=True, eq=False)
class NGramLanguage:
    """Tokens 0..vocab_size-1; the first `order-1` tokens form the initial state.

    initial: (S,) distribution over states (S = vocab_size ** (order-1), state = the last
    order-1 tokens in base vocab_size, oldest first); transition: (S, vocab_size) rows summing
    to 1 with exactly `support` non-zeros each.
    """

    vocab_size: int
    order: int
    initial: np.ndarray
    transition: np.ndarray

    @classmethod
    def random(cls, vocab_size: int = 8, order: int = 2, support: int = 2, seed: int = 0,
               concentration: float = 1.0) -> NGramLanguage:
        if order < 2:
            raise JdlmError(f"order={order}: an n-gram language needs order >= 2")
        if not 1 <= support <= vocab_size:
            raise JdlmError(f"support={support} must be between 1 and vocab_size={vocab_size}")
        rng = np.random.default_rng(seed)
        states = vocab_size ** (order - 1)
        transition = np.zeros((states, vocab_size))
        for s in range(states):
            allowed = rng.choice(vocab_size, size=support, replace=False)
            transition[s, allowed] = rng.dirichlet(np.full(support, concentration))
        initial = np.full(states, 1.0 / states)
        return cls(vocab_size, order, initial, transition)

    @property
    def num_states(self) -> int:
        return self.transition.shape[0]

    def _check(self, seqs: np.ndarray) -> np.ndarray:
        seqs = np.asarray(seqs)
        if seqs.ndim != 2 or seqs.shape[1] < self.order - 1:
            raise JdlmError(f"sequences must be (n, length >= {self.order - 1}), got {seqs.shape}")
        if seqs.min(initial=0) < 0 or seqs.max(initial=0) >= self.vocab_size:
            raise JdlmError(f"tokens must lie in [0, {self.vocab_size}); got a value outside")
        return seqs

    def _states(self, seqs: np.ndarray) -> np.ndarray:
        """(n, length - order + 2) state index before each generated token (and after the last)."""
        k = self.order - 1
        n, length = seqs.shape
        states = np.zeros((n, length - k + 1), dtype=np.int64)
        for j in range(k):
            states = states * self.vocab_size + seqs[:, j: length - k + 1 + j]
        return states

    def sample(self, num: int, length: int, seed: int = 0) -> np.ndarray:
        """(num, length) int32 sequences drawn exactly (ancestral sampling)."""
        if length < self.order - 1:
            raise JdlmError(f"length={length} is shorter than the context ({self.order - 1})")
        rng = np.random.default_rng(seed)
        k = self.order - 1
        state = rng.choice(self.num_states, size=num, p=self.initial)
        out = np.zeros((num, length), dtype=np.int32)
        for j in range(k):
            out[:, j] = (state // self.vocab_size ** (k - 1 - j)) % self.vocab_size
        cdf = np.cumsum(self.transition, axis=1)
        for t in range(k, length):
            u = rng.random(num)[:, None]
            tok = np.minimum((u > cdf[state]).sum(axis=1), self.vocab_size - 1)
            out[:, t] = tok
            state = (state * self.vocab_size + tok) % self.num_states
        return out

    def token_log_probs(self, seqs) -> np.ndarray:
        """(n, length) log-probability of each token given its past (-inf where impossible).

        The first order-1 tokens share the initial-state log-probability, spread evenly.
        """
        seqs = self._check(seqs)
        k = self.order - 1
        states = self._states(seqs)
        with np.errstate(divide="ignore"):
            init = np.log(self.initial[states[:, 0]])
            steps = np.log(self.transition[states[:, :-1], seqs[:, k:]])
        head = np.repeat((init / max(k, 1))[:, None], k, axis=1)
        return np.concatenate([head, steps], axis=1)

    def log_prob(self, seqs) -> np.ndarray:
        """(n,) exact log-probability of each whole sequence (-inf if impossible)."""
        return self.token_log_probs(seqs).sum(axis=1)

    def is_legal(self, seqs) -> np.ndarray:
        """(n,) True where every transition has positive probability."""
        return np.isfinite(self.log_prob(seqs))

    def entropy(self, length: int) -> float:
        """Exact entropy H(X_1..X_length) in nats, by propagating the state distribution."""
        if length < self.order - 1:
            raise JdlmError(f"length={length} is shorter than the context ({self.order - 1})")
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.nansum(np.where(self.transition > 0,
                                              self.transition * np.log(self.transition), 0.0), 1)
            p = self.initial
            total = -np.sum(np.where(p > 0, p * np.log(p), 0.0))
        for _ in range(length - (self.order - 1)):
            total += p @ row_entropy
            joint = p[:, None] * self.transition  # (state, token) -> next state
            nxt = np.zeros_like(p)
            targets = (np.arange(self.num_states)[:, None] * self.vocab_size
                       + np.arange(self.vocab_size)[None, :]) % self.num_states
            np.add.at(nxt, targets.ravel(), joint.ravel())
            p = nxt
        return float(total)

    def entropy_per_token(self, length: int) -> float:
        return self.entropy(length) / length
