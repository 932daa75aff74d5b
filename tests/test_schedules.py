"""SparsitySchedule: Zhu & Gupta cubic ramp, linear, one-shot, update steps, and steps from config fractions."""

from __future__ import annotations

import pytest

from hf_prune.config import PruningConfig
from hf_prune.schedules import SparsitySchedule


def _zhu_gupta(step: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3 for t0 <= t <= t0 + n*dt (Zhu & Gupta 2017, eq. 1)."""
    span = n * dt
    return s_f + (s_i - s_f) * (1 - (step - t0) / span) ** 3


@pytest.mark.parametrize("initial", [0.0, 0.2])
def test_cubic_follows_zhu_gupta(initial):
    schedule = SparsitySchedule("cubic", initial, 0.9, start_step=10, end_step=110, interval=10)
    for step in (10, 20, 35, 60, 85, 109, 110):
        expected = _zhu_gupta(step, initial, 0.9, t0=10, n=10, dt=10)
        assert schedule.sparsity_at(step) == pytest.approx(expected, abs=1e-12)
    # A few hand-checked values: progress 1/4 -> 0.9 * (1 - 0.75**3).
    assert SparsitySchedule("cubic", 0.0, 0.9, 0, 100, 10).sparsity_at(25) == pytest.approx(0.9 * (1 - 0.421875))
    assert SparsitySchedule("cubic", 0.0, 0.9, 0, 100, 10).sparsity_at(50) == pytest.approx(0.9 * 0.875)


def test_cubic_is_monotone_and_front_loaded():
    schedule = SparsitySchedule("cubic", 0.0, 0.8, 0, 100, 1)
    values = [schedule.sparsity_at(step) for step in range(0, 101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    # Cubic removes most weights early: past the linear ramp at the midpoint.
    assert values[50] > 0.4


def test_zero_before_start_even_with_initial_sparsity():
    schedule = SparsitySchedule("cubic", 0.3, 0.9, start_step=10, end_step=50, interval=5)
    assert schedule.sparsity_at(0) == 0.0
    assert schedule.sparsity_at(9) == 0.0
    assert schedule.sparsity_at(10) == pytest.approx(0.3)


def test_target_at_and_after_end():
    schedule = SparsitySchedule("cubic", 0.0, 0.9, start_step=10, end_step=50, interval=5)
    assert schedule.sparsity_at(50) == 0.9
    assert schedule.sparsity_at(51) == 0.9
    assert schedule.sparsity_at(10_000) == 0.9
    assert schedule.sparsity_at(50, target=0.5) == 0.5
    assert schedule.sparsity_at(30, target=0.45) == pytest.approx(_zhu_gupta(30, 0.0, 0.45, 10, 1, 40))


def test_linear():
    schedule = SparsitySchedule("linear", 0.1, 0.9, start_step=100, end_step=200, interval=10)
    assert schedule.sparsity_at(99) == 0.0
    assert schedule.sparsity_at(100) == pytest.approx(0.1)
    assert schedule.sparsity_at(125) == pytest.approx(0.1 + 0.8 * 0.25)
    assert schedule.sparsity_at(150) == pytest.approx(0.5)
    assert schedule.sparsity_at(200) == 0.9


def test_one_shot():
    schedule = SparsitySchedule("one_shot", 0.0, 0.7, start_step=20, end_step=20, interval=10)
    assert schedule.sparsity_at(19) == 0.0
    assert schedule.sparsity_at(20) == 0.7
    assert schedule.sparsity_at(500) == 0.7
    assert [step for step in range(100) if schedule.is_update_step(step)] == [20]


def test_update_steps_start_interval_and_end():
    # (end - start) = 85 is not a multiple of the interval: the end step is still an update.
    schedule = SparsitySchedule("cubic", 0.0, 0.9, start_step=10, end_step=95, interval=10)
    updates = [step for step in range(200) if schedule.is_update_step(step)]
    assert updates == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert schedule.sparsity_at(updates[-1]) == 0.9


def test_update_steps_when_end_is_a_multiple():
    schedule = SparsitySchedule("linear", 0.0, 0.5, start_step=3, end_step=9, interval=3)
    assert [step for step in range(20) if schedule.is_update_step(step)] == [3, 6, 9]


def test_from_config_maps_fractions_to_steps():
    config = PruningConfig(warmup_fraction=0.1, cooldown_fraction=0.3, pruning_interval=7, target_sparsity=0.8)
    schedule = SparsitySchedule.from_config(config, total_steps=1000)
    assert (schedule.start_step, schedule.end_step, schedule.interval) == (100, 700, 7)
    assert schedule.kind == "cubic"
    assert schedule.target_sparsity == 0.8
    assert schedule.sparsity_at(700) == 0.8
    assert schedule.is_update_step(700)


def test_from_config_rounds_and_clamps():
    config = PruningConfig(warmup_fraction=0.0, cooldown_fraction=0.25)
    schedule = SparsitySchedule.from_config(config, total_steps=10)
    # Step numbers start at 1 (Trainer global_step after the first optimizer step).
    assert schedule.start_step == 1
    assert schedule.end_step == 8  # round(0.75 * 10) = 8 (banker's rounding of 7.5)


def test_from_config_one_shot_ends_at_start():
    config = PruningConfig(schedule="one_shot", warmup_fraction=0.2, cooldown_fraction=0.3)
    schedule = SparsitySchedule.from_config(config, total_steps=50)
    assert schedule.start_step == schedule.end_step == 10


def test_from_config_needs_steps():
    with pytest.raises(ValueError, match="max_steps"):
        SparsitySchedule.from_config(PruningConfig(), total_steps=0)
