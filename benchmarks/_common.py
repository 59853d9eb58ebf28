"""Shared benchmark helpers: timing, the measured float32 matmul peak, and a table printer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from proxykd_jax.train.metrics import measure_matmul_peak


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 FLOP/s of an n^3 `jnp.dot` on this process's devices (fastest of `repeats`)."""
    return measure_matmul_peak(n=n, repeats=repeats)


def median_time(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median wall seconds of `fn()` after `warmup` untimed calls; `fn` must block until done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """name -> median wall seconds of `fns[name]()` over `reps` rounds of one call of each (after an untimed warm-up
    round), so that load from other processes hits them alike; each result is blocked on."""
    import jax

    times = {name: [] for name in fns}
    for r in range(reps + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Prints (and returns) a plain-text table with right-aligned numeric columns."""

    def fmt(x):
        if isinstance(x, float):
            return f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
        return str(x)

    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)), "-+-".join("-" * w for w in widths)]
    for row in cells:
        lines.append(
            " | ".join(c.rjust(w) if c[:1].isdigit() or c[:1] == "-" else c.ljust(w) for c, w in zip(row, widths))
        )
    text = "\n".join(lines)
    print(text)
    return text
