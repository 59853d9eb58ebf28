"""Defaults of the `report` config group (read by report/runner.py and report/settings.py)."""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    cd = ml_collections.ConfigDict()
    cd.settings = "specialised,perturbed"  # teacher–proxy pairs to run (report/settings.py), comma-separated
    cd.seeds = "0,1,2"  # seeds: each changes the prompts (so the samples), the inits and the data order
    cd.variants = ""  # variants to run (report/variants.py), comma-separated; "" = all but the own-token ones
    cd.nll_beta = 1e-6  # DPO beta of the NLL-only control rounds (beta -> 0 switches the preference term off)
    cd.specialise_noise = 0.1  # specialised teacher = general model's weights * (1 + noise * N(0, 1)) ...
    cd.style_words = 48  # ... with this many words favoured ...
    cd.style_boost = 1.0  # ... by this many nats of logit
    cd.general_prompts = 800  # prompts sent to the general model for the proxy's pre-training corpus
    cd.pretrain_steps = 1000  # SFT steps that pre-train the proxy (random init) on the general model's samples
    cd.pretrain_lr = 3e-3  # their peak learning rate
    cd.chartok_sft_steps = 300  # chartok: SFT warm-up steps of its randomly initialised proxy
    cd.chartok_max_chars = 40  # chartok: longest teacher response, in characters
    return cd
