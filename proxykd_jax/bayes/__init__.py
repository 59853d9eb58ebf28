"""The Bayesian estimator: corpus prior tables, the posterior kernel, sample weights and the
empirical Bayes fit of the prior strength kappa and the proxy evidence N_max (docs/METHOD.md)."""

from proxykd_jax.bayes.config import default_config, posterior_config, prior_config
from proxykd_jax.bayes.empirical import EBResult, HeldoutStats, fit_empirical_bayes, heldout_stats, score
from proxykd_jax.bayes.posterior import MODES, make_sharded_posterior, posterior_topk
from proxykd_jax.bayes.prior import PriorBuilder, PriorTables, SparsePrior, witten_bell_unigram
from proxykd_jax.bayes.weights import sample_weights, sequence_loglik, weight_stats

__all__ = [
    "EBResult",
    "HeldoutStats",
    "MODES",
    "PriorBuilder",
    "PriorTables",
    "SparsePrior",
    "default_config",
    "fit_empirical_bayes",
    "heldout_stats",
    "make_sharded_posterior",
    "posterior_config",
    "posterior_topk",
    "prior_config",
    "sample_weights",
    "score",
    "sequence_loglik",
    "weight_stats",
    "witten_bell_unigram",
]
