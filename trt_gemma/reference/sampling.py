"""Token sampling: greedy, temperature, top-k, top-p (nucleus), seeded through a numpy Generator.

The order of the filters follows transformers' default logits processors (temperature, then top-k, then top-p) so
that a seeded run draws from the same distribution; the random numbers themselves differ from torch's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trt_gemma.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. temperature 0 (or top_k 1) is greedy; top_k 0 and top_p 1.0 disable those filters.
    stop_token_ids end generation (pass the tokenizer's `stop_token_ids`: <eos>, <end_of_turn>); the default is
    none, because ids differ between tokenizers."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.temperature >= 0.0, "temperature must be >= 0 (0 means greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1] (1 disables it)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(f"sampling: {msg} (got max_tokens={self.max_tokens}, temperature={self.temperature}, "
                                 f"top_k={self.top_k}, top_p={self.top_p})", fix=msg)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def greedy(logits: np.ndarray) -> int:
    """argmax; ties go to the lowest id, as torch.argmax does."""
    return int(np.argmax(logits))


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties with the k-th kept, as transformers' TopKLogitsWarper), others -inf."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one token)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    mass_before = np.cumsum(probs) - probs  # probability of the tokens ranked above each one
    keep_sorted = mass_before < p
    keep = np.zeros(logits.size, bool)
    keep[order[keep_sorted]] = True
    return np.where(keep, logits, -np.inf)


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


class Sampler:
    """Draws one token from a logits row per call; holds its own Generator (seeded or fresh entropy)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a non-greedy draw uses (float64, sums to 1)."""
        p = self.params
        x = np.asarray(logits, np.float64) / p.temperature
        return softmax(top_p_filter(top_k_filter(x, p.top_k), p.top_p))

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits).reshape(-1)
        if self.params.is_greedy:
            return greedy(logits)
        probs = self.probabilities(logits)
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), logits.size - 1))
