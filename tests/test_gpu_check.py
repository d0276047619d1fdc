"""bench/gpu_check.py --dry-run (a subprocess, CPU, tiny models) runs every section of the device check and writes
its one table with every section and row: the cuda tests (skipped here), a golden in fp32 and bf16, the training
throughput eager and compiled, sampling for each method, and the Mamba2 comparison."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # about a minute: four tiny methods built, trained, sampled; two pytest sessions in it


def test_dry_run_writes_the_whole_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), str(tmp_path), "--dry-run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cells = {(r[0].lstrip("| "), r[1]): r[2] for r in rows}
    assert table.startswith("# scalegen device check (dry run, CPU")
    cuda = [row for (section, row), result in cells.items() if section == "cuda tests"]
    assert "test_fsdp2_one_gpu_sharded_save_and_resume[compile]" in cuda and len(cuda) == 8
    assert all(cells[("cuda tests", row)] == "skipped" for row in cuda)  # no CUDA here
    assert cells[("golden fp32 on cpu", "mvar_tiny_nol2.pt")] == "pass"
    assert cells[("golden bf16 on cpu", "mvar_tiny_nol2.pt")] == "measured"
    for attention in ("dense", "auto"):
        for mode in ("eager", "compile"):
            assert cells[("train bf16", f"VAR (tiny), {attention}, {mode}")] == "ok"
    for method in ("VAR", "FlexVAR", "M-VAR", "FlowAR"):
        assert cells[("sample bf16", f"{method} (tiny)")] == "ok"
    mamba = {row: result for (section, row), result in cells.items() if section == "mamba"}
    assert mamba["tiny M-VAR sampled tokens differing (count)"] == "pass"
    assert sum(result == "pass" for result in mamba.values()) == 6 and sum(r == "timed" for r in mamba.values()) == 8
    assert {row for (section, row) in cells if section == "time"} == {"cuda", "golden", "train", "sample", "mamba"}
    for line in rows:
        if line[0].lstrip("| ") == "train bf16":
            assert "img/s" in line[3] and "tok/s" in line[3] and "MFU" in line[3] and "peak" in line[3]
