"""tokens_per_s and mfu of the train loop's logged rows: `CallTimer` fed explicit clock readings, in the
order the loop makes them (a call is dispatched, then the previous call's metrics are read)."""

import pytest

from proxykd_jax.train.loop import CallTimer

TOKENS, FLOPS = 100, 1e6  # per step


def logged_rates(start: float, calls, log_every: int) -> dict[int, tuple[float, float] | None]:
    """{step: (tokens/s, FLOP/s) or None} of the rows a loop logs every `log_every` steps, for calls
    given as (steps, seconds their batches took to prepare, when their metrics arrived), the first
    call's dispatch returning at `start`."""
    timer, step, rows = CallTimer(), 0, {}
    timer.start(start)
    for steps, prep_seconds, arrival in calls:
        seconds = timer.arrived(arrival, steps, prep_seconds)
        for _ in range(steps):
            step += 1
            timer.add(TOKENS, seconds, FLOPS)
            if step % log_every == 0:
                rows[step] = timer.take()
    return rows


def test_windows_that_do_not_line_up_with_calls_get_the_rate_of_their_steps():
    """Calls of 8 steps, 1 s each, read at t = 10, 11, 12, logged every 3 steps: every row has the
    steady rate, whether its window lies inside one call or spans two (the old loop logged ~zero
    seconds for windows inside a call and the call's whole time for the next one)."""
    rows = logged_rates(9.0, [(8, 0.0, 10.0), (8, 0.0, 11.0), (8, 0.0, 12.0)], log_every=3)
    assert sorted(rows) == [3, 6, 9, 12, 15, 18, 21, 24]
    assert all(rate == pytest.approx((8 * TOKENS, 8 * FLOPS)) for rate in rows.values())


def test_the_first_calls_compile_is_left_out():
    """The first call's batches are ready at 0.5 s, its compile ends at 30.5 s; each call then runs
    1 s on the device while the host prepares the next (0.5 s): the first rows are as fast as the rest."""
    rows = logged_rates(30.5, [(4, 0.5, 31.5), (4, 0.5, 32.5), (4, 0.5, 33.5)], log_every=2)
    assert all(rate == pytest.approx((4 * TOKENS, 4 * FLOPS)) for rate in rows.values())


def test_a_host_bound_loop_counts_the_preparation_of_each_call():
    """Preparing a call's batches takes 1 s and the device is instant: each call's metrics arrive as
    the next call is dispatched, and the last call's as soon as they are asked for, yet every call
    took the host 1 s."""
    rows = logged_rates(1.0, [(4, 1.0, 2.0), (4, 1.0, 3.0), (4, 1.0, 3.0)], log_every=4)
    assert rows == {step: pytest.approx((4 * TOKENS, 4 * FLOPS)) for step in (4, 8, 12)}


def test_a_window_of_no_measurable_time_has_no_rate():
    timer = CallTimer()
    timer.start(5.0)
    timer.add(TOKENS, timer.arrived(5.0, 1, 0.0), FLOPS)
    assert timer.take() is None
    timer.add(TOKENS, timer.arrived(7.0, 2, 0.0), FLOPS)  # one step of a 2-step call of 2 s
    assert timer.take() == pytest.approx((TOKENS / 1.0, FLOPS / 1.0))
