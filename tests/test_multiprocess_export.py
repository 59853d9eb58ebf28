"""`export` as 2 jax.distributed processes x 4 CPU devices with the student split over all 8
(fsdp=8 spans both hosts): each process streams its half of the student from student/final, every
tensor is gathered across the processes only when it is written, process 0 writes size-limited
files, and they equal the 1-process export bit for bit."""

from __future__ import annotations

import json
import pathlib

import pytest
from stage_helpers import run_stage
from test_multiprocess_stages import Launch, base, two_runs  # noqa: F401  (base is a fixture)

from proxykd_jax.models.safetensors_io import SafetensorsFolder

pytestmark = pytest.mark.multiprocess


def test_export(base, tmp_path):  # noqa: F811
    one, two = two_runs(base, tmp_path, "export")
    for cfg in (one, two):
        cfg.mesh.shape.update(data=1, fsdp=8, tensor=1)
        cfg.export.max_shard_bytes = 4000
    launch = Launch("export", two, tmp_path / "export.log")
    out_one = run_stage("export", one)
    launch.wait()
    out_two = pathlib.Path(two.run.dir) / "export"
    index = json.loads((out_two / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(p.name for p in out_one.iterdir()) == sorted(p.name for p in out_two.iterdir())
    a, b = SafetensorsFolder(out_one), SafetensorsFolder(out_two)
    assert a.headers == b.headers
    for name in a.headers:
        assert a.read(name, ()).tobytes() == b.read(name, ()).tobytes(), name
    for f in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        assert (out_one / f).read_text() == (out_two / f).read_text()
