"""How sure a score is: Wilson intervals for an accuracy, and the paired comparison of two runs.

`wilson` gives the 95 % score interval of k successes in n; `Accuracy` formats a score with it.
`compare` puts two runs scored per question side by side on the questions both have: the
difference of mean scores (b - a) with a seeded paired bootstrap 95 % interval and, when every
score is 0 or 1, the exact two-sided McNemar p-value. The difference counts as larger than the
noise (`Comparison.significant`) when its interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

QuestionId = int | str
Z95 = 1.96
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_CHUNK = 1_000_000  # resampled scores drawn at a time (memory bound)


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (k may be fractional: a sum of soft
    scores); n = 0 says nothing, so (0.0, 1.0)."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Accuracy:
    """`correct` (a count, or a sum of scores in [0, 1]) out of `n`, with its Wilson interval."""

    correct: float
    n: int
    z: float = Z95

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.n, self.z)

    def __str__(self) -> str:
        """'71.2 % (n=500, 95 % CI 67.1-75.0)'."""
        low, high = self.interval
        return f"{100 * self.value:.1f} % (n={self.n}, 95 % CI {100 * low:.1f}-{100 * high:.1f})"


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the discordant pairs (right in one run only);
    under no difference each is Binomial(b + c, 1/2): p = min(1, 2 * P(X <= min(b, c)))."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclass(frozen=True)
class Comparison:
    n: int  # questions scored in both runs: everything below is over them
    mean_a: float
    mean_b: float
    difference: float  # mean_b - mean_a
    low: float  # paired bootstrap 95 % interval of the difference
    high: float
    p_value: float | None  # exact McNemar, when every score is 0 or 1; else None
    only_a: int = 0  # right in a, wrong in b (0/1 scores; else 0)
    only_b: int = 0  # right in b, wrong in a
    n_only_in_a: int = 0  # questions scored in a but not in b: not compared
    n_only_in_b: int = 0

    @property
    def significant(self) -> bool:
        """Larger than the noise: the interval excludes 0."""
        return self.low > 0 or self.high < 0


def bootstrap_interval(d: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the mean of `d` resampled with replacement."""
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK // len(d))
    means = [d[rng.integers(0, len(d), size=(min(step, resamples - i), len(d)))].mean(axis=1)
             for i in range(0, resamples, step)]
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(low), float(high)


def compare(a: Mapping[QuestionId, float], b: Mapping[QuestionId, float],
            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Comparison:
    """Run b against run a on the questions both scored (see the module docstring)."""
    common = [q for q in a if q in b]
    if not common:
        raise ValueError("compare: the two runs have no scored question in common")
    x = np.array([a[q] for q in common], dtype=np.float64)
    y = np.array([b[q] for q in common], dtype=np.float64)
    low, high = bootstrap_interval(y - x, resamples, seed)
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    only_a = int(((x == 1) & (y == 0)).sum()) if binary else 0
    only_b = int(((x == 0) & (y == 1)).sum()) if binary else 0
    return Comparison(len(common), float(x.mean()), float(y.mean()), float(y.mean() - x.mean()), low, high,
                      mcnemar_p(only_a, only_b) if binary else None, only_a, only_b,
                      len(a) - len(common), sum(1 for q in b if q not in a))
