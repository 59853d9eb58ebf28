"""Where each stage reads and writes inside one run directory (DESIGN.md §3).

<run_dir>/
  corpus/teacher.jsonl        collect   (or the user's own corpus files, data.corpus)
  prepared/                   prepare   records per split + manifest.json
  prior/                      prior     n-gram + trie tables + manifest.json
  proxy/                      align     checkpoints/ (SFT step, DPO rounds), metrics.jsonl, final/
  posterior/                  posterior sparse store shards + manifest.json (weights, EB fit)
  student/                    distill   checkpoints/, metrics.jsonl, final/
  student_sft/                distill with distill.alpha=0 (the SFT baseline)
  eval/                       eval      metrics.json (+ plots)
  export/                     export    Hugging Face folder
"""

from __future__ import annotations

import dataclasses
import pathlib


@dataclasses.dataclass(frozen=True)
class RunPaths:
    root: pathlib.Path

    @classmethod
    def from_config(cls, cfg) -> RunPaths:
        return cls(pathlib.Path(cfg.run.dir).expanduser())

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

    def student(self, name: str = "student") -> pathlib.Path:
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
