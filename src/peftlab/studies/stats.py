"""Statistics for a handful of seeds: mean ± std, t intervals, paired comparisons."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a t-based 95% interval of a few values."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    def text(self, digits: int = 4) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def interval(self, digits: int = 4) -> str:
        return "" if self.n < 2 else f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def summarize(values: list[float], confidence: float = 0.95) -> Summary:
    """Student t interval: with 2-5 seeds a normal interval would be far too narrow."""
    from scipy import stats

    array = np.asarray(values, dtype=float)
    n = len(array)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(array.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    """A configuration against the baseline, paired by seed."""

    pairs: int
    difference: Summary  # of (candidate - baseline) over the paired seeds
    p_value: float
    verdict: str


def paired_comparison(candidate: dict[int, float], baseline: dict[int, float], higher_is_better: bool = True,
                      alpha: float = 0.05) -> Comparison:
    """Paired t-test over the seeds both have: seeds share data order and initial head, so pairing
    removes their variance from the comparison. With fewer than 2 pairs nothing can be concluded."""
    from scipy import stats

    seeds = sorted(set(candidate) & set(baseline))
    deltas = [candidate[s] - baseline[s] for s in seeds]
    difference = summarize(deltas)
    if len(seeds) < 2:
        return Comparison(len(seeds), difference, math.nan, "too few paired seeds")
    if np.allclose(deltas, deltas[0]):
        # A constant difference (common when accuracy moves in steps of 1/n_eval) has zero variance and
        # an undefined t statistic. The exact sign-flip test still applies: of the 2^n sign patterns,
        # the 2 that keep every difference on one side are at least as extreme, so p = 2 / 2^n.
        p_value = 1.0 if deltas[0] == 0 else min(1.0, 2 * 0.5 ** len(seeds))
    else:
        p_value = float(stats.ttest_rel([candidate[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    if p_value >= alpha:
        verdict = "no detectable difference"
    else:
        verdict = "better" if (difference.mean > 0) == higher_is_better else "worse"
    return Comparison(len(seeds), difference, p_value, verdict)
