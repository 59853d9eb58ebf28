"""The report's variants, as a registry: each names the proxy alignment and the posterior its
student distils from (shared with every other variant naming the same ones) and the distill
overrides of its student.

Alignments (`ALIGNMENTS`): full = SFT warm-up + DPO rounds (the config's `align` group); sft = the
warm-up only; nll = the same rounds with beta -> 0 (`report.nll_beta`: DPO's gradient is off, the
rounds are NLL on teacher text); none = the initial proxy. Posteriors (`POSTERIORS`): eb = the
config's (weights, empirical Bayes); noweights = N_t = N_max everywhere; proxyonly = N_max = inf
(the proxy's soft labels); prioronly = N_max = 0 (the corpus prior's, kappa from the eb fit);
nohead = the eb posterior without the teacher's top log-probs (only where the corpus has them). The own token of a
stored response in its exact counts (`posterior.own_token`): noown = left out (the leave-one-out posterior the fit
scores: the default), halfown = counting one half, ownauto = counted once where the fit set the scale (`auto`, the
default before 2026-12-07: with several responses per prompt, as in every report setting, counted). Their
variants (no_own_token, half_own_token, own_token) are opt-in: a report runs them only where
`report.variants` names them.
"""

from __future__ import annotations

import dataclasses

ALIGNMENTS = ("full", "sft", "nll", "none")
POSTERIORS = ("eb", "noweights", "proxyonly", "prioronly", "nohead", "noown", "halfown", "ownauto")


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    align: str | None  # key of ALIGNMENTS (None: no proxy, no posterior)
    posterior: str | None  # key of POSTERIORS
    alpha_zero: bool = False  # the SFT baseline (distill.loss.alpha = 0)
    white_box: bool = False  # distil on the known teacher's true distributions (the ceiling)
    needs_logprobs: bool = False  # only in settings whose corpus has the teacher's top log-probs
    opt_in: bool = False  # run only when named in report.variants (not in the default "" = all)


VARIANTS: dict[str, Variant] = {
    "sft": Variant("SFT student (alpha = 0)", "full", "eb", alpha_zero=True),
    "proxykd": Variant("Proxy-KD (full)", "full", "eb"),
    "no_align": Variant("no alignment (initial proxy)", "none", "eb"),
    "sft_align": Variant("SFT-only alignment", "sft", "eb"),
    "nll_rounds": Variant("NLL-only rounds (beta -> 0)", "nll", "eb"),
    "no_weights": Variant("no sample weights", "full", "noweights"),
    "proxy_only": Variant("proxy-only soft labels (N_max = inf)", "full", "proxyonly"),
    "prior_only": Variant("prior-only soft labels (N_max = 0)", "full", "prioronly"),
    "no_own_token": Variant("posterior without the response's own token", "full", "noown", opt_in=True),
    "half_own_token": Variant("posterior with the own token counting 1/2", "full", "halfown", opt_in=True),
    "own_token": Variant("posterior counting the response's own token", "full", "ownauto", opt_in=True),
    "no_head": Variant("no teacher head (top log-probs unused)", "full", "nohead", needs_logprobs=True),
    "white_box": Variant("white-box ceiling (teacher's true distributions)", None, None, white_box=True),
}


DEFAULT_VARIANTS = tuple(name for name, v in VARIANTS.items() if not v.opt_in)  # report.variants = ""


def align_overrides(name: str, rcfg) -> dict:
    return {"full": {}, "sft": {"align.rounds": 0}, "nll": {"align.beta": float(rcfg.nll_beta)}}[name]


def posterior_overrides(name: str, eb_estimate: dict | None) -> dict:
    """Config overrides of posterior `name`; prioronly takes its kappa from the eb fit (`eb_estimate`)."""
    if name == "eb":
        return {}
    if name == "noweights":
        return {"posterior.use_weights": False}
    own = {"noown": "leave_out", "halfown": "0.5", "ownauto": "auto"}
    if name in own:
        return {"posterior.own_token": own[name]}
    if name == "nohead":
        return {"posterior.use_teacher_topk": False}
    if name == "proxyonly":
        return {"posterior.fit_empirical_bayes": False, "posterior.n_max": float("inf")}
    kappa = (eb_estimate or {}).get("heldout_loglik", {}).get("prior_kappa", 1.0)
    return {"posterior.fit_empirical_bayes": False, "posterior.n_max": 0.0, "prior.kappa": float(kappa)}
