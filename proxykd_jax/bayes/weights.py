"""Per-sample weights w(x, y) = sigmoid((l(x, y) - mu) / gamma) (docs/METHOD.md; Eq. 9 of the
paper's second version).

l is the proxy's log-likelihood of the teacher response (mean per token by default, or summed);
mu and gamma are its mean and standard deviation over the distillation split.
"""

import jax
import jax.numpy as jnp
import numpy as np

from proxykd_jax.errors import ProxyKDError

NORMALIZE = ("mean", "sum")


def sequence_loglik(token_logprobs_BxL, mask_BxL, *, normalize="mean"):
    """l per sample from the proxy's log-probs of the teacher tokens, over response positions."""
    if normalize not in NORMALIZE:
        raise ValueError(f"weights: normalize={normalize!r} is not one of {NORMALIZE}; set posterior.weight_normalize.")
    mask = mask_BxL.astype(jnp.float32)
    total = jnp.sum(token_logprobs_BxL.astype(jnp.float32) * mask, axis=-1)
    if normalize == "sum":
        return total
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def weight_stats(loglik_S, *, min_gamma=1e-6):
    """(mu, gamma): mean and standard deviation of l over the split (float64, host side).

    Bad input raises `ProxyKDError` (one sentence, no traceback from the CLI): a proxy with NaN or inf
    weights gives non-finite log-likelihoods."""
    x = np.asarray(loglik_S, np.float64).reshape(-1)
    if x.size == 0:
        raise ProxyKDError(
            "weights: no sample log-likelihoods to compute mu and gamma from; the distillation split is empty."
        )
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise ProxyKDError(
            f"weights: the proxy's log-likelihood of {bad} of {x.size} teacher responses is not finite (NaN or inf), "
            "so its weights or outputs are broken; check the proxy folder (posterior.proxy, or the align stage's "
            "proxy/final)."
        )
    return float(x.mean()), float(max(x.std(), min_gamma))


def sample_weights(loglik_S, mu, gamma):
    """w = sigmoid((l - mu) / gamma), element-wise (jnp or numpy inputs)."""
    return jax.nn.sigmoid((jnp.asarray(loglik_S, jnp.float32) - mu) / gamma)
