"""Test set-up: 8 simulated CPU devices and a persistent compilation cache.

Both must be in place before jax is imported anywhere.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Outside the checkout, so a fresh clone reuses what earlier runs compiled (entries are keyed by the
# program and the jax version; a stale one is never used).
_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "proxykd_jax" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
# Every program, however quick to compile: most of the suite's programs compile in under a second, and reading them
# back is faster (4 compile-bound test files: 127-132 s with a 0.5 s floor, 89-92 s with none; BUILD_NOTES)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
