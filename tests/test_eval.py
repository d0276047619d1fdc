"""Metrics against values computed here independently, the digits classifier, bad input, and the callback in a
2-step run (in-process, tiny model; ~25 s with the classifier's one-time training)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import PIXEL_FEATURES, tiny_module
from PIL import Image
from scipy import linalg

from scalegen.eval import classifier as digits
from scalegen.eval.metrics import (
    INCEPTION_FILE,
    Evaluator,
    UInt8Images,
    export_fid_stats_to_fidelity_cache,
    reference_from_folder,
    reference_from_images,
    reference_from_npz,
)

pytestmark = pytest.mark.threads(1)
D = PIXEL_FEATURES  # feature dimension of the `pixels` extractor (conftest)




def gaussian_images(n: int, mean, std, seed: int) -> torch.Tensor:
    """uint8 (n,3,4,4) images whose first D values are N(mean, std^2) per coordinate (rounded), the rest 0."""
    g = np.random.default_rng(seed)
    feats = np.clip(np.rint(g.normal(mean, std, size=(n, D))), 0, 255)
    flat = np.zeros((n, 48), dtype=np.uint8)
    flat[:, :D] = feats
    return torch.from_numpy(flat).reshape(n, 3, 4, 4)


def frechet(mu1, s1, mu2, s2) -> float:
    """The Fréchet distance, written here with scipy's sqrtm (torch-fidelity uses eigenvalues)."""
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feats_of(images: torch.Tensor) -> np.ndarray:
    return images.flatten(1)[:, :D].double().numpy()


def write_pngs(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


# -- metrics against independent values ---------------------------------------------------------------------------
def test_fid_of_two_known_gaussians_against_adm_style_statistics(pixels, tmp_path):
    mu1, sd1 = np.array([100, 120, 90, 140, 110, 130.]), np.array([10, 20, 15, 12, 8, 25.])
    mu2, sd2 = np.array([105, 110, 95, 150, 100, 135.]), np.array([12, 18, 10, 20, 8, 30.])
    npz = tmp_path / "VIRTUAL_ref.npz"
    np.savez(npz, mu=mu2, sigma=np.diag(sd2 ** 2))  # float64, as the ADM reference batches store them
    images = gaussian_images(4000, mu1, sd1, seed=0)
    ev = Evaluator(reference_from_npz(npz), ["fid"], pixels, cache_dir=tmp_path / "cache")
    fid = ev.evaluate(images)["fid"]

    f = feats_of(images)
    assert fid == pytest.approx(frechet(f.mean(0), np.cov(f, rowvar=False), mu2, np.diag(sd2 ** 2)), rel=1e-6)
    # the closed form of two diagonal Gaussians, |mu1-mu2|^2 + sum (sd1-sd2)^2, up to the sampling error of 4000 draws
    assert fid == pytest.approx(((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum(), rel=0.03)

    # the same statistics fed to torch-fidelity's own API through its cache (mu float32, sigma float64)
    import torch_fidelity
    export_fid_stats_to_fidelity_cache(npz, "adm-test", tmp_path / "tf-cache", pixels, "pixels")
    out = torch_fidelity.calculate_metrics(input1=UInt8Images(images), input2="never-read", input2_cache_name="adm-test",
                                           fid=True, feature_extractor=pixels, cache_root=str(tmp_path / "tf-cache"),
                                           cuda=False, verbose=False, save_cpu_ram=True)
    assert out["frechet_inception_distance"] == pytest.approx(fid, rel=1e-5)


def test_kid_precision_recall_fid_on_a_reference_folder(pixels, tmp_path):
    real = gaussian_images(30, 120, 20, seed=1)
    fake = gaussian_images(30, 125, 30, seed=2)
    folder = write_pngs(tmp_path / "ref", real)
    ev = Evaluator(reference_from_folder(folder), ["fid", "kid", "prc"], pixels, cache_dir=tmp_path / "cache",
                   kid_subset_size=30, kid_subsets=1, prc_neighborhood=3)
    got = ev.evaluate(fake)
    x, y = feats_of(fake), feats_of(real)

    # KID: unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3; one subset of all 30 = every image
    k = lambda a, b: (a @ b.T / D + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m = len(x)
    mmd = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert got["kid"] == pytest.approx(mmd, rel=1e-4, abs=1e-6)

    # precision/recall (Kynkäänniemi et al.): inside the ball to the 3rd nearest neighbour of some image of the other set
    def radii(a):
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sort(d, axis=1)[:, 3]  # [:, 0] is the image itself
    d_xy = np.linalg.norm(x[:, None] - y[None], axis=-1)
    assert got["precision"] == pytest.approx((d_xy <= radii(y)[None]).any(1).mean())
    assert got["recall"] == pytest.approx((d_xy.T <= radii(x)[None]).any(1).mean())
    assert 0 < got["precision"] < 1 or 0 < got["recall"] < 1  # not a degenerate case

    assert got["fid"] == pytest.approx(frechet(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)),
                                       rel=1e-5)

    # the reference's features are cached and reused: a second evaluator never reads the folder
    ref = reference_from_folder(folder)
    ref.load_images = lambda: pytest.fail("the cached reference features were not reused")
    again = Evaluator(ref, ["fid", "kid", "prc"], pixels, cache_dir=tmp_path / "cache", kid_subset_size=30,
                      kid_subsets=1).evaluate(fake)
    assert again == pytest.approx(got)
    # ... and a changed folder is another cache entry
    write_pngs(folder, gaussian_images(1, 10, 1, seed=3))
    assert reference_from_folder(folder).name != ref.name


def test_adm_reference_batch_images_for_kid_statistics_for_fid(pixels, tmp_path):
    real, fake = gaussian_images(30, 120, 20, seed=1), gaussian_images(30, 125, 30, seed=2)
    mu, sigma = np.full(D, 118.0), np.diag(np.full(D, 400.0))
    npz = tmp_path / "ref.npz"  # the layout of VIRTUAL_imagenet256_labeled.npz: arr_0 uint8 NHWC, mu, sigma
    np.savez(npz, arr_0=real.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma)
    ref = reference_from_npz(npz)
    assert ref.count == 30 and ref.image_size == (4, 4)
    got = Evaluator(ref, ["fid", "kid"], pixels, cache_dir=tmp_path, kid_subset_size=30, kid_subsets=1).evaluate(fake)
    x, y = feats_of(fake), feats_of(real)
    assert got["fid"] == pytest.approx(frechet(x.mean(0), np.cov(x, rowvar=False), mu, sigma), rel=1e-6)  # the npz's stats
    k = lambda a, b: (a @ b.T / D + 1) ** 3  # ... and its images for KID
    mmd = (k(x, x).sum() - np.trace(k(x, x)) + k(y, y).sum() - np.trace(k(y, y))) / (30 * 29) - 2 * k(x, y).mean()
    assert got["kid"] == pytest.approx(mmd, rel=1e-4, abs=1e-6)


# -- bad input: clear errors, before generating ---------------------------------------------------------------------
def test_bad_references_and_missing_weights_fail_clearly(pixels, tmp_path, monkeypatch):
    small = reference_from_folder(write_pngs(tmp_path / "small", gaussian_images(5, 100, 10, seed=0)))
    with pytest.raises(ValueError, match=r"5 images, too few for kid \(callbacks.eval.kid_subset_size = 10, needs 10\)"):
        Evaluator(small, ["kid"], pixels, kid_subset_size=10).check(100, 4)
    with pytest.raises(ValueError, match="generated images are 8x8, the reference .* 4x4"):
        Evaluator(small, ["fid"], pixels).check(100, 8)
    with pytest.raises(ValueError, match="3 generated images are too few for prc"):
        Evaluator(small, ["prc"], pixels).check(3, 4)
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=np.zeros(D), sigma=np.eye(D))
    with pytest.raises(ValueError, match=r"\['kid'\] need reference images"):
        Evaluator(reference_from_npz(stats_only), ["fid", "kid"], pixels).check(100, 4)
    np.savez(stats_only, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d, the test-pixels features 6-d"):
        Evaluator(reference_from_npz(stats_only), ["fid"], pixels).check(100, 4)
    with pytest.raises(ValueError, match="class_acc needs feature_extractor=digits"):
        Evaluator(small, ["class_acc"], pixels)

    missing = tmp_path / "models" / INCEPTION_FILE
    with pytest.raises(FileNotFoundError, match=f"get {INCEPTION_FILE} .* put it at {missing}"):
        Evaluator(small, ["fid"], "inception", weights=missing)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no path given: where torch-fidelity would look
    with pytest.raises(FileNotFoundError, match="hub/checkpoints/" + INCEPTION_FILE + ".*callbacks.eval.inception_weights"):
        Evaluator(small, ["fid"], "inception")


def test_callback_fails_in_setup_before_generating(classifier_file, tmp_path):
    from scalegen.eval.callback import EvalCallback
    folder = write_pngs(tmp_path / "ref", gaussian_images(5, 100, 10, seed=0).repeat(1, 1, 8, 8))  # 32x32
    module = SimpleNamespace(num_classes=10, generate=lambda *a, **k: pytest.fail("generated before the checks"))
    trainer = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(image_size=32), default_root_dir=str(tmp_path),
                              strategy=SimpleNamespace(barrier=lambda *a: None, root_device=torch.device("cpu")))
    cb = EvalCallback(reference=str(folder), classifier=str(classifier_file), cache_dir=str(tmp_path / "c"),
                      metrics=["fid", "kid"], kid_subset_size=10)
    with pytest.raises(ValueError, match="has 5 images, too few for kid"):
        cb.setup(trainer, module, "fit")
    cb = EvalCallback(feature_extractor="inception", inception_weights=str(tmp_path / INCEPTION_FILE), reference=str(folder))
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        cb.setup(trainer, module, "fit")


# -- the digits classifier ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    """Trained once per test session (~10 s on one thread), shared with the other eval test files."""
    path, _ = digits.ensure_classifier(tmp_path_factory.getbasetemp() / digits.FILE_NAME)
    return path


@pytest.fixture(scope="module")
def real_digits():
    from scalegen.data import DigitsDataModule
    data = DigitsDataModule(image_size=32)
    to_u8 = lambda x: x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    (tr, ytr), (va, yva) = data.real_images("train"), data.real_images("val")
    return to_u8(tr), ytr, to_u8(va), yva


def test_classifier_accuracy_and_metrics_in_its_feature_space(classifier_file, real_digits, tmp_path):
    train, _, val, val_labels = real_digits
    model, info = digits.load_classifier(classifier_file)
    with torch.no_grad():
        preds = model(val).argmax(1)
    assert info["test_accuracy"] == pytest.approx((preds == val_labels).float().mean().item())
    assert info["test_accuracy"] >= 0.95 and info["test_images"] == len(val_labels)
    assert digits.ensure_classifier(classifier_file)[1] == info  # cached: loaded, not trained again

    ref = reference_from_images(train, "digits-train")
    ev = Evaluator(ref, ["fid", "kid", "prc", "class_acc"], "digits", weights=classifier_file, cache_dir=tmp_path,
                   kid_subset_size=100)
    real = ev.evaluate(val, val_labels)
    assert real["class_acc"] == pytest.approx(info["test_accuracy"])
    noise = torch.randint(0, 256, val.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = ev.evaluate(noise, val_labels)
    assert real["fid"] * 10 < bad["fid"] and real["kid"] < bad["kid"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and bad["recall"] < 0.5 and bad["class_acc"] < 0.5

    # registered with torch-fidelity: its own pipeline gives the same FID in this feature space
    import torch_fidelity
    out = torch_fidelity.calculate_metrics(input1=UInt8Images(val), input2=UInt8Images(train), fid=True,
                                           feature_extractor=digits.FEATURE_EXTRACTOR, cache=False, cuda=False,
                                           feature_extractor_weights_path=str(classifier_file), verbose=False,
                                           save_cpu_ram=True)
    assert out["frechet_inception_distance"] == pytest.approx(real["fid"], rel=1e-4)


# -- the callback in a 2-step run ------------------------------------------------------------------------------------
def test_callback_in_a_two_step_run(classifier_file, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from scalegen.data import DigitsDataModule
    from scalegen.eval.callback import EvalCallback, TrainingStats

    L.seed_everything(0)
    module = tiny_module("data.batch_size=8")
    cb = EvalCallback(every_n_steps=1, per_class=2, batch_size=8, classifier=str(classifier_file),
                      cache_dir=str(tmp_path / "cache"), kid_subset_size=10)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(str(tmp_path), name="", version=""),
                        callbacks=[cb, TrainingStats()], default_root_dir=str(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    evals = {int(r["step"]): r for r in rows if r.get("eval/fid")}
    assert sorted(evals) == [1, 2]  # every step, and not again at the end
    for r in evals.values():
        assert all(math.isfinite(float(r[f"eval/{k}"])) for k in ("fid", "kid", "precision", "recall", "images_per_s"))
        assert 0 <= float(r["eval/class_acc"]) <= 1 and float(r["eval/images_per_s"]) > 0

    real = json.loads((tmp_path / "eval_reference.json").read_text())
    assert real["images"] == 20 and real["split"] == "val"
    assert real["classifier_test_accuracy"] == digits.load_classifier(classifier_file)[1]["test_accuracy"]
    assert real["metrics"]["class_acc"] >= 0.9

    stats = json.loads((tmp_path / "run_stats.json").read_text())
    assert stats["params"] == sum(p.numel() for p in module.generator.parameters())
    assert stats["steps"] == 2 and stats["train_images"] == 16 and stats["train_images_per_s"] > 0
    assert 0 < stats["train_step_s"] < stats["train_wall_s"]

    # each rank draws its share: two simulated ranks' shares give exactly the one-process features and metrics
    one = cb.draw_share(module, 0, 1)
    two = [cb.draw_share(module, r, 2) for r in range(2)]
    assert sorted(torch.cat([s[1] for s in two]).tolist()) == list(range(20)) and len(two[1][1]) < 20
    got, want = cb.score_shares(two, 10), cb.score_shares([one], 10)
    assert {k: v for k, v in got.items() if k != "images_per_s"} == {k: v for k, v in want.items() if k != "images_per_s"}
    assert want["fid"] == pytest.approx(float(evals[2]["eval/fid"]))  # fixed seeds: the logged value again
