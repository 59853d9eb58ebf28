"""Your own Hugging Face folders: `--config=configs/hf.py:STUDENT_FOLDER[,PROXY_FOLDER]`.

    configs/hf.py:/models/tinyllama,/models/llama-2-7b   a student and a proxy folder
    configs/hf.py:/models/qwen2-0.5b                     one folder: the proxy has the student's shape

Each model group takes its shape and numerics (vocabulary, widths, depth, heads, RoPE, norm epsilon,
q/k/v bias, q/k norm, tied embeddings, context; Gemma's norms, activation, attention scale, Gemma 3's per-layer RoPE
and Gemma 2's soft-caps) from its folder's config.json (Llama, Mistral, Qwen2, Qwen3, Gemma 2 (`Gemma2ForCausalLM`),
Gemma 3 text (`Gemma3ForCausalLM`), SmolLM3 and Phi-3 architectures)
and points `init_from` at the folder, so nothing is typed twice and the load-time check (the folder must agree
with its group) holds by construction. `data.tokenizer` is the proxy folder's
tokenizer (the student's if the proxy folder has none): the two must share it (prepare, align and distill
refuse a folder holding another one), though their embeddings may be padded to different sizes
(Qwen2.5-0.5B's 151,936 rows, Qwen2.5-7B's 152,064, for 151,665 tokens), each at least the tokenizer's.
Compute is bfloat16 over float32 weights, as in configs/llama.py; rows are 2,048 tokens or the shorter of
the two contexts. Any field can still be overridden on the command line.
"""

import pathlib

from proxykd_jax.config import base_config
from proxykd_jax.context import FOLDER_FIELDS
from proxykd_jax.models.hf import read_config
from proxykd_jax.models.tokenizer import has_tokenizer


def _from_folder(group, folder: pathlib.Path):
    model = read_config(folder)  # one sentence on a missing folder, config.json or unsupported architecture
    for field in FOLDER_FIELDS:  # the fields init_model checks the folder against
        group[field] = getattr(model, field)
    group.init_from = str(folder)
    group.param_dtype = "float32"  # master weights
    group.dtype = "bfloat16"  # compute
    return model


def get_config(arg: str):
    student_arg, _, proxy_arg = arg.partition(",")
    if "," in proxy_arg:
        raise ValueError(f"configs/hf.py takes one or two folders (student, proxy), got {arg!r}.")
    if not student_arg:
        raise ValueError("configs/hf.py needs a student folder: --config=configs/hf.py:STUDENT_FOLDER[,PROXY_FOLDER].")
    student = pathlib.Path(student_arg).expanduser()
    proxy = pathlib.Path(proxy_arg).expanduser() if proxy_arg else student
    cfg = base_config()
    contexts = [_from_folder(cfg.model, student).max_seq_len, _from_folder(cfg.proxy, proxy).max_seq_len]
    cfg.train.seq_len = cfg.data.seq_len = min(2048, *contexts)
    for folder in (proxy, student):
        if has_tokenizer(folder):
            cfg.data.tokenizer = str(folder)
            break
    cfg.run.dir = f"runs/{student.name}-from-{proxy.name}"
    cfg.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
    return cfg.lock()
