"""Norm guidance: the projection of ‖W_out‖_RMS→∞ to the end of a run against the optimal norm."""

import math

import pytest

from disco_ds.trainer.guidance import NormGuide, reachable_norm


def guide_after(growth_exponent, scale, steps=200, final_step=2000, target=128.0):
    guide = NormGuide(target, final_step)
    for s in range(1, steps + 1):
        guide.observe(s, scale * s**growth_exponent)
    return guide.project()


def test_projection_follows_the_recent_power_law():
    p = guide_after(0.5, 3.0)
    assert p.final_norm == pytest.approx(3.0 * 2000**0.5, rel=1e-6)
    assert p.step == 200 and p.norm == pytest.approx(3.0 * 200**0.5)


def test_far_too_high_lr_is_flagged_high_and_near_target_is_on_track():
    high = guide_after(0.6, 10.0)  # heads for ~960
    assert high.verdict == "high"
    assert "lr likely too high" in high.message(2.5e9) and "2,500,000,000 tokens" in high.message(2.5e9)
    near = guide_after(0.5, 128.0 / 2000**0.5)  # lands on 128
    assert near.verdict == "on track" and near.final_norm == pytest.approx(128.0, rel=1e-6)
    assert guide_after(0.3, 1.0).verdict == "low"


def test_only_the_recent_piece_of_a_broken_power_law_counts():
    guide = NormGuide(128.0, 1000)
    for s in range(1, 101):  # fast early growth, then slow: the paper's piecewise log-log growth
        guide.observe(s, s**1.0 if s <= 40 else 40 * (s / 40) ** 0.2)
    p = guide.project()
    assert p.final_norm == pytest.approx(40 * (1000 / 40) ** 0.2, rel=1e-3)


def test_projection_is_capped_by_what_the_updates_can_reach_and_needs_data():
    guide = NormGuide(128.0, 1000)
    for s in range(1, 4):
        guide.observe(s, float(s))
    assert guide.project() is None
    for s in range(4, 50):
        guide.observe(s, float(s))
    assert guide.project(remaining_lr_sum=10.0).final_norm == pytest.approx(49 + 10.0)
    assert reachable_norm(1.0, [0.01] * 1000) == pytest.approx(11.0)
    assert math.isclose(reachable_norm(1.0, [0.5] * 300, radius=2.0), 301.0)
