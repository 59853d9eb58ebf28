"""Defaults of the `eval` group (read by the eval stage and eval/metrics.py) and of the `demo` group (the known
teacher, eval/benchmark.py, which re-exports them as `default_config`); no flax: config checks and
`proxykd <stage> --help` read this module alone."""

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


def demo_config() -> ml_collections.ConfigDict:
    """Defaults of the `demo` group: the known teacher and the collected corpus."""
    cd = ml_collections.ConfigDict()
    cd.teacher_seed = 1234  # seed the known teacher is built from
    cd.teacher_d_model = 64  # teacher width (the proxy has the teacher's shape: config.proxy)
    cd.teacher_num_layers = 2  # teacher depth
    cd.teacher_entropy = 1.5  # mean next-token entropy of the teacher (nats)
    cd.num_prompts = 400  # prompts sent to the teacher
    cd.samples_per_prompt = 4  # teacher responses per prompt (informs the per-prompt tries)
    cd.max_new_tokens = 24  # longest teacher response
    cd.proxy_noise = 0.15  # proxy init = teacher weights * (1 + proxy_noise * N(0, 1)), element-wise
    cd.teacher_tokenizer = (
        "same"  # "same": the teacher tokenises like the student; "char": a character-level teacher (docs/TOKENIZERS.md)
    )
    return cd


CHAR_TEACHER_VOCAB = 36  # the character teacher: 4 specials + 32 characters (a few of them two UTF-8 bytes)
