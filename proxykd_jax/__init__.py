"""proxykd_jax: distil a black-box LLM into a small open one through a Bayesian
estimate of its output distribution (Proxy-KD, arXiv 2401.07013), in JAX.

Shape legend used in names across the package:
  B batch, L length, P prompt length, T generated length, D model width,
  V vocabulary, K top-k, H query heads, G key/value heads, E head dim,
  F feed-forward width, N flattened tokens (B*L), S samples, C cache length.
"""

__version__ = "0.1.0"
