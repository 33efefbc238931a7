"""The static kernel-resource report (benchmarks/kernel_resources.py)."""

import json
import shutil
import sys
from pathlib import Path

import pytest

# benchmarks/ is not installed; appended (not prepended) so an installed colabx still comes first
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks import kernel_resources as kr  # noqa: E402


@pytest.mark.parametrize(("regs", "blocks"), [(24, 10), (32, 8), (48, 5), (64, 4), (74, 3),
                                              (80, 3), (90, 2), (128, 2), (255, 1)])
def test_blocks_per_sm_follows_the_register_allocation_unit(regs, blocks):
    assert kr.blocks_per_sm(regs) == blocks


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_report_on_the_distance_transform_kernels(tmp_path, capsys):
    out = tmp_path / "kr.json"
    assert kr.main(["--files", "distance_transform.cu", "--match", "rows_", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["kernels"]
    assert rows and all(r["kernel"].startswith("rows_") for r in rows)
    for r in rows:
        assert 0 < r["registers"] <= 255
        assert r["blocks_per_sm_256"] == kr.blocks_per_sm(r["registers"])
    assert "rows_kernel" in capsys.readouterr().out


def test_unknown_source_is_named():
    with pytest.raises(SystemExit, match="no_such.cu"):
        kr.main(["--files", "no_such.cu"])
