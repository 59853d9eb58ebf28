"""The ablation report: every part of Proxy-KD measured on one teacher corpus, over seeds.

    proxykd report --config=configs/report.py

For each *setting* (a teacher–proxy pair, `report/settings.py`) and each seed, one corpus, one
`prepare` and one prior are made; the proxy alignments and posteriors the *variants*
(`report/variants.py`) need are made once each and shared; every variant's student is trained
and scored against the known teacher (`report/metrics.py`). The result of each (setting, seed,
variant) is a JSON file written atomically, so a killed report resumes where it stopped;
`report/tables.py` and `report/plots.py` turn them into `<run>/report/report.md` and PNGs.

The names other than `default_config` load with their modules (which import the whole pipeline) on their first
use (`proxykd_jax.deferred`): config checks and `proxykd <stage> --help` read the `report` group's defaults (`report/config.py`) alone.
"""

from proxykd_jax.deferred import names_of
from proxykd_jax.report.config import default_config

__all__ = ["SETTINGS", "VARIANTS", "Setting", "Variant", "default_config", "run_report"]

__getattr__ = names_of(
    __name__, {"runner": ("run_report",), "settings": ("SETTINGS", "Setting"), "variants": ("VARIANTS", "Variant")}
)
