import math

import pytest

from peftlab.studies.stats import paired_comparison, summarize


def test_summary_of_known_numbers_uses_student_t():
    stat = summarize([1.0, 2.0, 3.0])
    assert (stat.n, stat.mean, stat.std) == (3, 2.0, 1.0)
    # t(0.975, df=2) = 4.302653; half width = t * std / sqrt(n)
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert stat.low == pytest.approx(2.0 - half, abs=1e-5)
    assert stat.high == pytest.approx(2.0 + half, abs=1e-5)
    assert stat.text(2) == "2.00 ± 1.00" and stat.interval(2) == "[-0.48, 4.48]"


def test_single_value_has_no_spread():
    stat = summarize([0.7])
    assert stat.mean == 0.7 and math.isnan(stat.std) and stat.interval() == ""


def test_paired_difference_detected_with_the_closed_form_p_value():
    candidate = {1: 0.80, 2: 0.82, 3: 0.81}
    baseline = {1: 0.70, 2: 0.73, 3: 0.71}
    result = paired_comparison(candidate, baseline)
    deltas = [0.10, 0.09, 0.10]
    mean = sum(deltas) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2)
    t = mean / (sd / math.sqrt(3))
    # Student t with 2 degrees of freedom: two-sided p = 1 - |t| / sqrt(t^2 + 2)
    assert result.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-6)
    assert result.pairs == 3 and result.difference.mean == pytest.approx(mean)
    assert result.verdict == "better"
    assert paired_comparison(baseline, candidate).verdict == "worse"
    assert paired_comparison(baseline, candidate, higher_is_better=False).verdict == "better"


def test_noisy_small_difference_is_not_called_a_difference():
    result = paired_comparison({1: 0.851, 2: 0.842, 3: 0.860}, {1: 0.850, 2: 0.853, 3: 0.849})
    assert result.p_value > 0.05 and result.verdict == "no detectable difference"


def test_only_shared_seeds_are_paired():
    result = paired_comparison({1: 0.9, 2: 0.8}, {2: 0.7, 3: 0.6})
    assert result.pairs == 1 and result.verdict == "too few paired seeds" and math.isnan(result.p_value)


def test_a_constant_difference_uses_the_exact_sign_flip_test():
    # 32 eval examples: both seeds one example better. Two seeds cannot make that significant.
    two = paired_comparison({1: 0.59375, 2: 0.5625}, {1: 0.5625, 2: 0.53125})
    assert two.p_value == pytest.approx(0.5) and two.verdict == "no detectable difference"
    six = paired_comparison({s: 0.6 for s in range(6)}, {s: 0.5 for s in range(6)})
    assert six.p_value == pytest.approx(2 / 64) and six.verdict == "better"
    same = paired_comparison({1: 0.5, 2: 0.5}, {1: 0.5, 2: 0.5})
    assert same.p_value == 1.0 and same.verdict == "no detectable difference"
