"""Where each stage reads and writes inside one run directory.

<run_dir>/
  proxykd.lock                the run-directory lock (held while a stage runs; see context/lock.py)
  demo/                       demo      the known teacher, the prompts sent to it, the proxy's init
  corpus/teacher.jsonl        collect   (or the user's own corpus files, data.corpus)
  prepared/                   prepare   records per split + manifest.json, tokenizer/
  prior/                      prior     n-gram + trie tables + manifest.json
  proxy/                      align     sft/ and round_NNN/ (params/, checkpoints/ while running), metrics.jsonl, final/
  posterior/                  posterior sparse store shards + estimate.json (weights, EB fit)
  student/                    distill   checkpoints/, metrics.jsonl, final/
  student_sft/                distill with distill.loss.alpha = 0 (the SFT baseline)
  eval/                       eval      metrics.json, scored/<model>.json (each model's scores, kept for a resume)
  export/                     export    Hugging Face folder
  choose/<field>/             choose    <value>/ per candidate (a run directory, linking the run's folders), choice.json
Each finished folder holds `artifact.json` (the corpus: `teacher.jsonl.artifact.json` beside it):
the config fields, upstream artifacts, input files and model folders it was made from and their
hash (context/artifacts.py).
"""

from __future__ import annotations

import dataclasses
import pathlib

STUDENT, STUDENT_SFT = "student", "student_sft"


def student_name(distill_cfg) -> str:
    """The distill output folder: `distill.output`, else student_sft for alpha = 0, else student."""
    if distill_cfg.output:
        return str(distill_cfg.output)
    return STUDENT_SFT if float(distill_cfg.loss.alpha) == 0.0 else STUDENT


@dataclasses.dataclass(frozen=True)
class RunPaths:
    root: pathlib.Path

    @classmethod
    def from_config(cls, cfg) -> RunPaths:
        return cls(pathlib.Path(cfg.run.dir).expanduser())

    @property
    def lock(self) -> pathlib.Path:
        return self.root / "proxykd.lock"

    @property
    def demo(self) -> pathlib.Path:
        return self.root / "demo"

    @property
    def corpus(self) -> pathlib.Path:
        return self.root / "corpus" / "teacher.jsonl"

    @property
    def prepared(self) -> pathlib.Path:
        return self.root / "prepared"

    @property
    def prior(self) -> pathlib.Path:
        return self.root / "prior"

    @property
    def proxy(self) -> pathlib.Path:
        return self.root / "proxy"

    @property
    def posterior(self) -> pathlib.Path:
        return self.root / "posterior"

    def student(self, name: str = STUDENT) -> pathlib.Path:
        return self.root / name

    @property
    def eval(self) -> pathlib.Path:
        return self.root / "eval"

    @property
    def export(self) -> pathlib.Path:
        return self.root / "export"

    @property
    def tokenizer(self) -> pathlib.Path:
        """The tokenizer folder the run uses (copied here by `prepare`)."""
        return self.root / "prepared" / "tokenizer"
