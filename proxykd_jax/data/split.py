"""Deterministic prompt-level splits: warm-up, alignment, distillation and held-out.

A prompt's split depends only on a hash of (salt, prompt id), never on the other prompts, so adding
samples never moves an existing prompt, and every response of a prompt lands in the same split.
"""

import hashlib

from proxykd_jax.data.config import SPLITS


def split_fractions(split_cfg) -> dict[str, float]:
    """Validated fractions per split (they must be non-negative and sum to 1)."""
    fr = {name: float(split_cfg[name]) for name in SPLITS}
    if not all(v >= 0 for v in fr.values()) or not abs(sum(fr.values()) - 1.0) <= 1e-6:  # NaN fails both
        raise ValueError(f"data.split fractions must be >= 0 and sum to 1, got {fr}.")
    return fr


def prompt_unit(record_id: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the prompt id and the salt."""
    digest = hashlib.sha256(f"{salt}\x00{record_id}".encode()).digest()
    return int.from_bytes(digest[:7], "little") / float(1 << 56)


def assign_split(record_id: str, fractions: dict[str, float], salt: str) -> str:
    """The split of a prompt: the bucket of `prompt_unit` in the cumulative fractions."""
    u = prompt_unit(record_id, salt)
    acc = 0.0
    last = next(name for name in reversed(SPLITS) if fractions[name] > 0)
    for name in SPLITS:
        acc += fractions[name]
        if u < acc and fractions[name] > 0:
            return name
    return last
