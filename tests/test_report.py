"""The comparison report from a small Hydra multirun on the built-in digits: two `model=var` settings, 2 steps each
(one subprocess, ~35 s)."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from scalegen.eval import classifier as digits
from scalegen.eval.report import build_report

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> Path:
    classifier, _ = digits.ensure_classifier(tmp_path_factory.getbasetemp() / digits.FILE_NAME)  # shared, trained once
    root = tmp_path_factory.mktemp("multirun") / "sweep"
    cmd = [sys.executable, "train.py", "-m", "experiment=compare", "budget.kind=steps", "budget.value=null",
           "backbone.depth=1,2", "backbone.width=32",
           "backbone.num_heads=2", "trainer.max_steps=2", "tokenizer_training.max_steps=2", "data.batch_size=8",
           "trainer.log_every_n_steps=1", "sample.per_class=2", "callbacks.eval.every_n_steps=1",
           "callbacks.eval.per_class=2", "callbacks.eval.kid_subset_size=10", f"callbacks.eval.classifier={classifier}",
           f"callbacks.eval.cache_dir={root.parent / 'cache'}", f"hydra.sweep.dir={root}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"multirun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return root


def last(run: Path, key: str) -> float:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)][-1]


def test_report_from_a_small_multirun(multirun):
    runs = sorted(p for p in multirun.iterdir() if (p / "config.yaml").is_file())
    assert [p.name for p in runs] == ["0_var", "1_var"]
    out = build_report(multirun)
    md = (out / "report.md").read_text()

    lines = [l for l in md.splitlines() if l.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["run", "method", "params", "tokenizer params", "train FLOPs", "images seen", "train wall time",
                    "train images/s", "sample images/s", "sample FLOPs/image", "FID", "KID", "precision", "recall",
                    "class acc", "config diff vs the first run"]
    rows = {r[0]: dict(zip(head, r)) for r in ([c.strip() for c in l.strip("|").split("|")] for l in lines[1:4])}
    assert list(rows) == ["backbone.depth=1", "backbone.depth=2", "real val images (20)"]
    for run, label in zip(runs, ["backbone.depth=1", "backbone.depth=2"]):
        stats = json.loads((run / "run_stats.json").read_text())
        row = rows[label]
        assert row["method"] == "var"
        assert row["params"] == f"{stats.get('params_generator', stats['params']):,}"  # under 100k: in full
        # each metric with its bootstrap interval (callbacks.eval.bootstrap)
        assert row["FID"] == f"{last(run, 'eval/fid'):.2f} [{last(run, 'eval/fid_low'):.2f}, {last(run, 'eval/fid_high'):.2f}]"
        assert row["KID"].startswith(f"{last(run, 'eval/kid'):.4f} [")
        assert row["class acc"].startswith(f"{last(run, 'eval/class_acc'):.3f} [")
        assert json.loads((run / "eval_bootstrap.json").read_text())["replicates"]["fid"]
        tok = json.loads((run / "tokenizer" / "tokenizer_stats.json").read_text())
        assert tok["images"] > 0 and tok["rfid"] >= 0 and tok["psnr"] > 0
        assert row["sample images/s"] == f"{last(run, 'eval/images_per_s'):.1f}"
        assert row["train wall time"].endswith(" s") and float(row["train images/s"]) > 0
    assert int(rows["backbone.depth=2"]["params"].replace(",", "")) > int(rows["backbone.depth=1"]["params"].replace(",", ""))
    assert rows["backbone.depth=1"]["config diff vs the first run"] == "(first run)"
    assert rows["backbone.depth=2"]["config diff vs the first run"] == "backbone.depth: 2 (first: 1)"
    real = json.loads((runs[0] / "eval_reference.json").read_text())["metrics"]
    assert rows["real val images (20)"]["class acc"].startswith(f"{real['class_acc']:.3f}")
    assert "## Tokenizers: reconstruction of the validation split" in md and "## Error bars and differences" in md

    # every picture the pages point to exists and is a PNG: grids side by side, curves, the one-picture summary
    html = (out / "report.html").read_text()
    assert "<table>" in html and html.split("</table>")[0].count("<tr>") == 4  # the main table; sections follow
    for page in (md, html):
        images = re.findall(r"\]\(([^)]+\.png)\)", page) + re.findall(r"src='([^']+\.png)'", page)
        assert {"curves/train_loss.png", "curves/eval_fid.png", "curves/eval_class_acc.png"} <= set(images)
        assert len([i for i in images if i.startswith("grids/")]) == 2
        for rel in images:
            assert Image.open(out / rel).format == "PNG"
    grid = Image.open(out / "grids" / "0_backbone.depth=1.png")
    assert grid.size == Image.open(runs[0] / "samples" / "final.png").size
    assert Image.open(out / "summary.png").size[0] > 500


def test_report_of_a_folder_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folders"):
        build_report(tmp_path)


def test_params_come_from_the_checkpoint_without_run_stats(tmp_path):
    """A run trained without callbacks=eval has no run_stats.json: the report counts the generator's parameters in
    its checkpoint (the summary showed dashes before)."""
    import torch
    from omegaconf import OmegaConf

    from scalegen.eval.report import read_run
    (tmp_path / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.create({"model": {"name": "var"}}), tmp_path / "config.yaml")
    state = {"generator.backbone.w": torch.zeros(3, 4), "generator.head.b": torch.zeros(5),
             "ema.backbone.w": torch.zeros(3, 4), "tokenizer.conv": torch.zeros(7)}
    torch.save({"state_dict": state}, tmp_path / "checkpoints" / "last.ckpt")
    assert read_run(tmp_path).stats["params"] == 17


def test_the_digits_classifier_shows_its_progress(monkeypatch):
    """Its first training (minutes on a loaded machine) runs under a progress bar over its steps."""
    seen = []

    def track(steps, **kw):
        seen.append((len(steps), kw.get("description")))
        return steps

    monkeypatch.setattr(digits, "track", track)
    digits.train_classifier(steps=2, log=lambda *_: None)
    assert seen == [(2, "[scalegen] digits classifier")]
