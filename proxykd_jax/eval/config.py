"""Defaults of the `eval` group (read by the eval stage and eval/metrics.py)."""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    cd = ml_collections.ConfigDict()
    cd.split = "heldout"  # split whose teacher responses are scored
    cd.max_samples = 256  # cap on scored samples (0 = all)
    cd.batch_size = 16  # samples per forward pass
    cd.generate_prompts = 32  # prompts the students answer for the teacher-likelihood metric (known teacher only)
    cd.max_new_tokens = 32  # length of those generations (0 = no generations)
    cd.known_teacher = ""  # folder of a KnownTeacher (the demo's): adds KL-to-teacher metrics; "" = real teacher
    return cd
