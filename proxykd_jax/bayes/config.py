"""Defaults of the `prior` and `posterior` config groups (the Bayesian estimator, docs/METHOD.md)."""

import ml_collections

MODES = ("expected", "sampled", "geometric")  # posterior.mode
KERNELS = ("xla", "pallas")  # posterior.kernel: expected mode's top-k as XLA ops, or in one Pallas kernel (GPU)
OWN_TOKEN = ("auto", "count", "leave_out")  # posterior.own_token's names (or a weight in [0, 1], as a string)


def prior_config() -> ml_collections.ConfigDict:
    """The `prior` group: corpus tables and the prior strength."""
    cd = ml_collections.ConfigDict()
    cd.ngram_order = 4  # n of the Witten–Bell n-gram (context = last n-1 response tokens); 1 = unigram
    cd.exact_top_s = 16  # next tokens kept per prompt prefix in the exact trie (most frequent first)
    cd.ngram_top_s = 32  # continuations kept per n-gram context and order; the rest moves to the floor
    cd.kappa = 1.0  # prior strength: a_t = exact_t + kappa * p_ngram (replaced by the EB fit if on)
    cd.buffer_pairs = 2_000_000  # (context, token) pairs buffered before merging: bounds build memory
    return cd


def posterior_config() -> ml_collections.ConfigDict:
    """The `posterior` group: the proxy update, top-k store width, weights and the EB fit."""
    cd = ml_collections.ConfigDict()
    cd.mode = "expected"  # "expected" (N p_t), "sampled" (M proxy draws), "geometric" (ablation)
    cd.proxy = ""  # aligned proxy (Hugging Face folder); "" = <run>/proxy/final from `align`
    cd.batch_size = 8  # samples per proxy forward (global, one per row; cut to the batch's longest of seq_len's halves)
    cd.n_max = 16.0  # N_max: proxy evidence in pseudo-observations, N_t = N_max * w (EB may replace it)
    cd.num_samples = 64  # M, proxy draws per token in "sampled" mode
    cd.beta = 1.0  # weight of log prior_mean in "geometric" mode (> 0)
    cd.use_teacher_topk = True  # fix the head to the teacher's top log-probs where the corpus has them
    cd.weight_normalize = "mean"  # proxy log-likelihood per sample: "mean" per token, or "sum"
    cd.use_weights = True  # N_t = N_max * w(x, y); False: N_t = N_max everywhere
    cd.chunk_tokens = 1024  # tokens of the batch per tile of the proxy's logits in both passes: bounds [tokens, vocab]
    cd.kernel = "xla"  # expected mode's top-k: "xla", or "pallas" (one kernel, one read of the logits, CUDA; untimed)
    cd.fit_empirical_bayes = True  # fit kappa and N_max by held-out log-likelihood before the pass
    cd.eb_holdout_fraction = 0.05  # fraction of the distillation split's responses held out for the EB fit
    cd.eb_refine_steps = 12  # golden-section steps per parameter after the grid search
    # (the leave-one-out posterior the fit scored; "count": once, as the observed draw; "auto": count where the fit
    # set the scale; docs/METHOD.md)
    cd.own_token = "leave_out"  # a stored response's own token in its exact counts: leave_out, count, auto, or "0.5"
    return cd


def default_config() -> ml_collections.ConfigDict:
    """Both groups, as `prior` and `posterior`."""
    return ml_collections.ConfigDict({"prior": prior_config(), "posterior": posterior_config()})
