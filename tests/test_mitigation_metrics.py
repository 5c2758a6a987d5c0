"""verl's rollout_corr/* metrics and the shares a correction truncates or masks, against values worked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from noisebench.train.rollout_corr import correction_metrics, offpolicy_metrics, rollout_corr_metrics

# Two sequences; the second has a padded last position (its values must not count).
# Hand-chosen log-ratios r = logp_train - logp_rollout: seq 0 = [ln 1.5, 0, -ln 4], seq 1 = [0, ln 1.8, (pad)].
R = [[math.log(1.5), 0.0, -math.log(4.0)], [0.0, math.log(1.8), 0.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _logps():
    sampling = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 123.0]], dtype=torch.float64)
    train = sampling + torch.tensor(R, dtype=torch.float64)
    train[1, 2] = -999.0  # padding: garbage on both sides
    return sampling, train


def test_offpolicy_metrics_match_hand_values():
    s, t = _logps()
    got = offpolicy_metrics(s, t, MASK)
    r = [math.log(1.5), 0.0, -math.log(4.0), 0.0, math.log(1.8)]
    assert got["kl"] == pytest.approx(-sum(r) / 5, rel=1e-12)                      # -ln(0.675) / 5
    assert got["k3_kl"] == pytest.approx((0.5 - 0.75 + 0.8 + math.log(4 / 2.7)) / 5, rel=1e-12)
    seq = [-(math.log(1.5) - math.log(4.0)) / 3, -math.log(1.8) / 2]            # mean_t logp_rollout - logp_train
    assert got["log_ppl_diff"] == pytest.approx(sum(seq) / 2, rel=1e-12)
    assert got["log_ppl_abs_diff"] == pytest.approx((abs(seq[0]) + abs(seq[1])) / 2, rel=1e-12)
    assert got["chi2_token"] == pytest.approx((2.25 + 1 + 1 / 16 + 1 + 3.24) / 5 - 1, rel=1e-12)
    assert got["chi2_seq"] == pytest.approx((0.375 ** 2 + 1.8 ** 2) / 2 - 1, rel=1e-12)   # products 0.375, 1.8


def test_identical_logps_give_zero_mismatch_and_full_ess():
    s, _ = _logps()
    got = rollout_corr_metrics(s, s.clone(), MASK, level="token", mode="truncate", upper=2.0)
    for k in ("kl", "k3_kl", "log_ppl_diff", "log_ppl_abs_diff", "chi2_token", "chi2_seq",
              "rollout_is_truncated_fraction", "rollout_rs_masked_fraction"):
        assert got[f"rollout_corr/{k}"] == 0.0, k
    assert got["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("level, mode, lower, truncated, masked, seq_masked", [
    # token weights 1.5, 1, 0.25 | 1, 1.8: only 0.25 leaves [0.5, 2]; nothing exceeds 2
    ("token", "truncate", None, 0.0, 0.0, 0.0),
    ("token", "truncate", 0.5, 1 / 5, 0.0, 0.0),
    ("token", "mask", 0.5, 0.0, 1 / 5, 1 / 2),
    # sequence weights 0.375 (3 tokens) and 1.8 (2 tokens): the first leaves [0.5, 2], all its tokens with it
    ("sequence", "truncate", None, 0.0, 0.0, 0.0),
    ("sequence", "truncate", 0.5, 3 / 5, 0.0, 0.0),
    ("sequence", "mask", 0.5, 0.0, 3 / 5, 1 / 2),
    ("sequence", "mask", None, 0.0, 0.0, 0.0),
])
def test_truncated_and_masked_shares_follow_the_definitions(level, mode, lower, truncated, masked, seq_masked):
    s, t = _logps()
    got = correction_metrics(s, t, MASK, level=level, mode=mode, upper=2.0, lower=lower)
    assert got["rollout_is_truncated_fraction"] == pytest.approx(truncated)
    assert got["rollout_rs_masked_fraction"] == pytest.approx(masked)
    assert got["rollout_rs_seq_masked_fraction"] == pytest.approx(seq_masked)


def test_upper_bound_share_on_a_large_synthetic_ratio():
    # 10k tokens with r ~ N(0, 0.5^2): the share above ln 2 is P(Z > ln2 / 0.5) by definition
    g = torch.Generator().manual_seed(0)
    s = torch.randn(100, 100, generator=g, dtype=torch.float64) - 3
    r = 0.5 * torch.randn(100, 100, generator=g, dtype=torch.float64)
    got = correction_metrics(s, s + r, torch.ones(100, 100), level="token", mode="truncate", upper=2.0)
    assert got["rollout_is_truncated_fraction"] == float((r > math.log(2.0)).double().mean())
    expected = 0.5 * math.erfc(math.log(2.0) / 0.5 / math.sqrt(2))
    assert abs(got["rollout_is_truncated_fraction"] - expected) < 4 * math.sqrt(expected * (1 - expected) / 1e4)


def test_ess_matches_verl_formula():
    s, t = _logps()
    got = correction_metrics(s, t, MASK, level="token", upper=2.0)
    w = [1.5, 1.0, 0.5, 1.0, 1.8]                 # token weights clamped to [1/2, 2]
    m = sum(w) / 5
    assert got["rollout_is_eff_sample_size"] == pytest.approx(1 / (sum((x / m) ** 2 for x in w) / 5), rel=1e-6)


def test_non_finite_sampler_logps_are_left_out():
    s, t = _logps()
    s2 = s.clone()
    s2[0, 1] = float("nan")
    m2 = MASK.clone()
    m2[0, 1] = 0
    assert offpolicy_metrics(s2, t, MASK) == pytest.approx(offpolicy_metrics(s, t, m2))
    assert offpolicy_metrics(s, t, torch.zeros_like(MASK)) == {}
