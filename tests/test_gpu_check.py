"""benchmarks/gpu_check.py --tiny runs end to end on CPU and prints its one table."""

import importlib.util
import pathlib
import re

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_gpu_check_tiny_prints_the_table(capsys):
    rows = gpu_check.main(["--tiny"])
    out = capsys.readouterr().out
    alone = [f"kernel [pallas alone: {n}]" for n in ("dense top-k", "whole, 4 warps", "whole, 8 warps")]
    names = ["distill", "sft", "kd", "kernel", "kernel [chunk 0, block pallas]", *alone]
    assert [r[0] for r in rows] == names
    assert "ids as XLA's in 100.0% of rows" in rows[4][2]  # the Pallas kernel (interpreted) finds the same top-k
    mfus = [float(m) for m in re.findall(r"MFU (\d+\.\d)%", out)]
    assert len(mfus) == 2 and all(0 < m < 100 for m in mfus)
    assert re.search(r"overhead [+-]\d+\.\d%", out) and re.search(r"% of HBM", out)
