"""The report's sections on synthetic run folders with known answers: scaling exponents, error bars and the
differences they decide, the speed–quality Pareto fronts, the tokenizer rows (seconds; no training)."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from scalegen.eval.frontier import pareto_mask
from scalegen.eval.report import build_report
from scalegen.eval.tokenizer_eval import evaluate_tokenizer, psnr, ssim

EXPONENTS = {"var": (-0.25, -0.10), "flowar": (-0.15, -0.20)}  # (loss vs params, FID vs training FLOPs)


def make_run(folder: Path, method: str, depth: int, seed: int, stats: dict, rows: list[dict],
             replicates: dict | None = None, tokenizer: dict | None = None) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"model": {"name": method}, "backbone": {"depth": depth}, "seed": seed}),
                   folder / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"model={method}", f"backbone.depth={depth}", f"seed={seed}"]),
                   folder / ".hydra" / "overrides.yaml")
    keys = sorted({k for r in rows for k in r})
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    (folder / "run_stats.json").write_text(json.dumps(stats))
    if replicates:
        (folder / "eval_bootstrap.json").write_text(json.dumps({"step": 10, "replicates": replicates}))
    if tokenizer:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "tokenizer_stats.json").write_text(json.dumps(tokenizer))
    return folder


def md_table(md: str, first_head: str, having: str = "") -> list[dict]:
    """The rows of the first table whose header starts with `first_head` and holds `having`."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_head} |") and having in l)
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for l in lines[start + 2:]:
        if not l.startswith("| "):
            break
        rows.append(dict(zip(head, [c.strip() for c in l.strip("|").split("|")])))
    return rows


@pytest.fixture
def scaling_sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    wiggle = [1.01, 0.99, 1.005, 0.995]  # small known noise: the fits are not exact
    job = 0
    for method, (a_loss, a_fid) in EXPONENTS.items():
        for i, depth in enumerate((2, 4, 8, 16)):
            params = 1e5 * depth ** 2
            flops = 6 * params * 1e6
            loss, fid = 3.0 * params ** a_loss * wiggle[i], 400 * flops ** a_fid * wiggle[::-1][i]
            rows = [{"step": 1, "train/loss": loss * 2}, {"step": 10, "val/loss": loss},
                    {"step": 10, "eval/fid": fid, "eval/fid_low": fid * 0.9, "eval/fid_high": fid * 1.1}]
            stats = {"params_generator": params, "params_tokenizer": 12345, "train_flops": flops, "images_seen": 640,
                     "sample_flops_per_image": 2 * params * 100}
            make_run(root / f"{job}_{method}", method, depth, 0, stats, rows)
            job += 1
    return root


def test_scaling_fits_state_the_known_exponents_and_draw_them(scaling_sweep):
    out = build_report(scaling_sweep)
    md = (out / "report.md").read_text()
    fits = {(r["method"], r["quantity"], r["against"]): r for r in md_table(md, "method")}
    for method, (a_loss, a_fid) in EXPONENTS.items():
        row = fits[(method, "final loss", "parameters")]
        assert float(row["exponent"]) == pytest.approx(a_loss, abs=0.01) and row["runs"] == "4"
        low, high = map(float, re.findall(r"-?\d+\.\d+", row["95% interval"]))
        assert low < a_loss < high and high - low < 0.1
        assert float(fits[(method, "FID", "training FLOPs")]["exponent"]) == pytest.approx(a_fid, abs=0.01)
    for name in ("scaling_loss_vs_params", "scaling_fid_vs_train_flops"):
        assert Image.open(out / "scaling" / f"{name}.png").format == "PNG"
        assert f"(scaling/{name}.png)" in md
    # the new columns of the main table
    main = {r["run"]: r for r in md_table(md, "run")}
    row = main["model=var backbone.depth=2"]
    assert row["params"] == "0.40 M" and row["tokenizer params"] == "12,345" and row["images seen"] == "640"
    assert row["train FLOPs"] == f"{6 * 4e5 * 1e6:.3g}" and row["sample FLOPs/image"] == f"{2 * 4e5 * 100:.3g}"
    fid = 400 * (6 * 4e5 * 1e6) ** -0.10 * 0.995
    assert row["FID"] == f"{fid:.2f} [{fid * 0.9:.2f}, {fid * 1.1:.2f}]"


def test_error_bars_decide_which_differences_are_real(tmp_path):
    root = tmp_path / "sweep"
    g = np.random.default_rng(0)
    reps = {"a": g.normal(10.0, 0.2, 200), "b": g.normal(10.05, 0.2, 200), "c": g.normal(12.0, 0.2, 200)}
    for i, (name, fid) in enumerate({"a": 10.0, "b": 10.05, "c": 12.0}.items()):
        make_run(root / f"{i}_{name}", name, 2, 0, {"params": 10}, [{"step": 5, "eval/fid": fid}],
                 replicates={"fid": reps[name].tolist()})
    for seed, acc in enumerate((0.80, 0.82, 0.81)):  # one config, three seeds
        make_run(root / f"{3 + seed}_seeds", "d", 2, seed, {"params": 10},
                 [{"step": 5, "eval/fid": 20.0 + seed, "eval/class_acc": acc}])
    md = (build_report(root) / "report.md").read_text()
    seeds = md_table(md, "runs")
    assert len(seeds) == 1 and seeds[0]["seeds"] == "3"
    mean, low, high = map(float, re.findall(r"\d+\.\d+", seeds[0]["FID"]))
    assert mean == 21.0 and high - mean == pytest.approx(4.302653 * 1.0 / math.sqrt(3), abs=0.01)
    pairs = {(r["A"], r["B"]): r for r in md_table(md, "A")}
    label = lambda n: f"model={n} seed=0"  # backbone.depth=2 is every run's: left out of the labels
    assert not pairs[(label("a"), label("b"))]["FID A−B"].count("*")  # 0.05 apart, 0.28 spread: no difference
    assert "*" in pairs[(label("a"), label("c"))]["FID A−B"] and "(bootstrap)" in pairs[(label("a"), label("c"))]["FID A−B"]
    assert f"{label('a')} vs {label('c')}: differ beyond the 95% uncertainty in FID" in md
    assert f"{label('a')} vs {label('b')}: no difference beyond the uncertainty" in md


def test_pareto_mask_against_brute_force():
    costs = np.random.default_rng(1).random((60, 2))
    brute = [not any((costs[j] <= costs[i]).all() and (costs[j] < costs[i]).any() for j in range(60))
             for i in range(60)]
    assert pareto_mask(costs).tolist() == brute and 0 < sum(brute) < 60
    assert pareto_mask([[1, 1], [1, 1], [2, 0]]).tolist() == [True, True, True]  # equal points both stay


def test_frontier_marks_each_methods_front(tmp_path):
    root = tmp_path / "train"
    make_run(root / "0_var", "var", 2, 0, {"params": 10}, [{"step": 1, "train/loss": 1.0}])
    sweep = tmp_path / "samples"
    points = {"var": [(10, 1.0, 5e6), (8, 0.5, 9e6), (12, 2.0, 3e6), (11, 0.8, 4e6)],  # (fid, images/s, FLOPs)
              "flowar": [(9, 0.3, 1e7), (9.5, 0.2, 2e7)]}
    for method, pts in points.items():
        for i, (fid, ips, flops) in enumerate(pts):
            job = sweep / f"{method}_{i}"
            job.mkdir(parents=True)
            (job / "sample_stats.json").write_text(json.dumps(
                {"method": method, "options": {"cfg_scale": 1 + i}, "images_per_s": ips,
                 "sample_flops_per_image": flops, "metrics": {"fid": fid, "fid_low": fid - 1, "fid_high": fid + 1}}))
    out = build_report(root, frontier=[sweep])
    md = (out / "report.md").read_text()
    rows = md_table(md, "method")
    on_speed = {(r["method"], r["settings"]) for r in rows if r["front (images/s)"] == "●"}
    on_flops = {(r["method"], r["settings"]) for r in rows if r["front (FLOPs)"] == "●"}
    # (11, 0.8 images/s) is beaten by (10, 1.0); flowar's second point by its first on both axes
    assert on_speed == {("var", "cfg_scale=1"), ("var", "cfg_scale=2"), ("var", "cfg_scale=3"), ("flowar", "cfg_scale=1")}
    # on FLOPs (11, 4e6) is on the front: nothing cheaper has a lower FID than 11 but (12, 3e6) is cheaper and worse
    assert on_flops == on_speed | {("var", "cfg_scale=4")}
    for name in ("frontier_images_per_s", "frontier_sample_flops_per_image"):
        assert Image.open(out / "frontier" / f"{name}.png").format == "PNG"


# -- the tokenizer's evaluation -------------------------------------------------------------------------------------
def test_psnr_and_ssim_known_values():
    img = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(img, img)).all() and ssim(img, img) == pytest.approx(torch.ones(4))
    shifted = (img + 0.1).clamp(0, 1)
    mse = (shifted - img).square().flatten(1).mean(1)
    assert psnr(shifted, img) == pytest.approx(-10 * torch.log10(mse), rel=1e-5)
    noisy = img.clone()
    noisy[..., ::2, :] = 1 - noisy[..., ::2, :]
    assert (ssim(noisy, img) < 0.5).all()


class Identity(torch.nn.Module):
    """A 'tokenizer' that reconstructs perfectly and hits codes 0..3 at scale 0, code 0 at scale 1 (vocab 8)."""
    discrete = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, img):
        return img, 0.0, [torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]), torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 0])]


def test_evaluate_tokenizer_of_a_perfect_tokenizer_and_its_report_row(tmp_path):
    batches = [(torch.rand(5, 3, 16, 16) * 2 - 1, torch.zeros(5)) for _ in range(3)]
    stats = evaluate_tokenizer(Identity(), batches, max_images=12)
    assert stats["images"] == 12 and math.isinf(stats["psnr"]) and stats["ssim"] == pytest.approx(1.0)
    assert stats["codebook_usage"] == {"s0": 50.0, "s1": 12.5} and stats["rfid"] is None
    make_run(tmp_path / "0_var", "var", 2, 0, {"params": 10}, [{"step": 1, "train/loss": 1.0}],
             tokenizer={**stats, "psnr": 31.234, "rfid": 1.5})
    md = (build_report(tmp_path) / "report.md").read_text()
    row, = md_table(md, "run", having="PSNR (dB)")
    assert row["PSNR (dB)"] == "31.23" and row["SSIM"] == "1.0000" and row["rFID"] == "1.50"
    assert row["codebook use per scale (%)"] == "50 / 12" and row["LPIPS"] == "—"


def test_a_trained_tokenizer_is_evaluated_on_the_validation_split(tmp_path):
    """evaluate_run_tokenizer, as train.py calls it after the tokenizer stage: a real multi-scale VQ on a datamodule's
    val batches, one codebook share per scale, and the PSNR the training module's own formula gives."""
    from types import SimpleNamespace

    from conftest import tiny_vq
    from torch.utils.data import DataLoader, TensorDataset

    from scalegen.eval.tokenizer_eval import evaluate_run_tokenizer
    from scalegen.tokenizers.train import psnr as train_psnr
    torch.manual_seed(0)
    images = torch.rand(12, 3, 8, 8) * 2 - 1
    data = SimpleNamespace(val_dataloader=lambda: DataLoader(TensorDataset(images, torch.zeros(12)), batch_size=12))
    tok = tiny_vq().eval()
    stats = json.loads(evaluate_run_tokenizer(tok, data, tmp_path).read_text())
    assert stats["images"] == 12 and list(stats["codebook_usage"]) == ["s0", "s1", "s2"]
    assert all(0 < v <= 100 for v in stats["codebook_usage"].values())
    with torch.no_grad():
        recon = tok(images)[0].clamp(-1, 1)
    assert stats["psnr"] == pytest.approx(train_psnr(recon, images).item(), rel=1e-4) and -1 < stats["ssim"] < 1
    latents = SimpleNamespace(val_dataloader=lambda: [{"latent": torch.zeros(2, 4, 2, 2)}])
    assert evaluate_run_tokenizer(tok, latents, tmp_path / "none") is None  # cached latents: nothing to reconstruct
