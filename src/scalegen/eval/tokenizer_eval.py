"""A tokenizer's reconstruction quality on held-out images: PSNR and SSIM (torchmetrics, on [0, 1]), rFID (FID of the
reconstructions against the originals in a torch-fidelity feature space), LPIPS (when its local weights are given)
and codebook use per scale (the share of the codebook the split hit at least once, from the per-scale hit counts a
discrete tokenizer's forward returns). Written as tokenizer_stats.json at the end of tokenizer training; the report
shows one row per run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch

from scalegen.eval.metrics import Evaluator, to_uint8

FILE_NAME = "tokenizer_stats.json"


def psnr(recon: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] (inf where identical)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio
    return peak_signal_noise_ratio(recon, img, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(recon: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of images in [0, 1], the usual 11-px Gaussian window (smaller on images under 11 px)."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    side = min(11, *img.shape[-2:])
    side -= 1 - side % 2  # an odd window
    return structural_similarity_index_measure(recon, img, data_range=1.0, reduction="none", kernel_size=side)


@torch.no_grad()
def evaluate_tokenizer(tokenizer: torch.nn.Module, batches: Iterable, evaluator: Evaluator | None = None,
                       perceptual: torch.nn.Module | None = None, max_images: int | None = None) -> dict:
    """Reconstruction metrics over `batches` of images in [-1, 1] ((images, labels) or bare tensors)."""
    was_training = tokenizer.training
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    p_list, s_list, l_list, hits = [], [], [], None
    feats: dict[str, list] = {"real": [], "recon": []}
    n = 0
    try:
        for batch in batches:
            img = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
            if max_images is not None:
                img = img[:max_images - n]
            if not len(img):
                break
            recon, _, stats = tokenizer(img)
            recon = (recon[-1] if isinstance(recon, (list, tuple)) else recon).clamp(-1, 1).float()
            a, b = recon.add(1).div(2).cpu(), img.float().add(1).div(2).cpu()
            p_list.append(psnr(a, b))
            s_list.append(ssim(a, b))
            if perceptual is not None:
                l_list.append(perceptual(recon, img.float()).flatten().cpu())
            if tokenizer.discrete and isinstance(stats, (list, tuple)):
                counts = [h.detach().float().cpu() for h in stats]
                hits = counts if hits is None else [x + y for x, y in zip(hits, counts)]
            if evaluator is not None:
                layer = evaluator.layers["fid"]
                feats["real"].append(evaluator.features(to_uint8(b))[layer])
                feats["recon"].append(evaluator.features(to_uint8(a))[layer])
            n += len(img)
    finally:
        tokenizer.train(was_training)
    if not n:
        raise ValueError("evaluate_tokenizer: no images in the given batches")
    out = {"images": n, "psnr": _mean(torch.cat(p_list)), "ssim": _mean(torch.cat(s_list)),
           "lpips": _mean(torch.cat(l_list)) if l_list else None, "rfid": None,
           "codebook_usage": {f"s{k}": (h > 0).float().mean().item() * 100 for k, h in enumerate(hits or [])}}
    if evaluator is not None:
        out["rfid"] = frechet(torch.cat(feats["recon"]), torch.cat(feats["real"]))
        out["feature_extractor"] = evaluator.name
    return out


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (torch-fidelity's statistics and distance)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    stats = [fid_features_to_statistics(x.double()) for x in (a, b)]
    return float(fid_statistics_to_metric(*stats, False)[KEY_METRIC_FID])


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean().item())  # inf where every image is identical


def write(stats: dict, folder: str | Path) -> Path:
    path = Path(folder) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=1))
    return path


def tokenizer_table(rows: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """The report's rows: one per run with a tokenizer evaluation."""
    head = ["run", "images", "PSNR (dB)", "SSIM", "rFID", "LPIPS", "codebook use per scale (%)"]
    f = lambda v, spec: "—" if v is None else ("inf" if math.isinf(v) else format(v, spec))
    body = []
    for label, s in rows:
        usage = s.get("codebook_usage") or {}
        body.append([label, str(s.get("images", "—")), f(s.get("psnr"), ".2f"), f(s.get("ssim"), ".4f"),
                     f(s.get("rfid"), ".2f"), f(s.get("lpips"), ".4f"),
                     " / ".join(f"{v:.0f}" for v in usage.values()) or "—"])
    return head, body


def evaluate_run_tokenizer(tokenizer: torch.nn.Module, data, folder: str | Path, *, feature_extractor: str | None = None,
                           weights: str | None = None, cache_dir: str | None = None,
                           perceptual_weights: str | None = None) -> Path | None:
    """At the end of tokenizer training: the validation split of `data` (a datamodule), rFID in `feature_extractor`'s
    space (None: no rFID), LPIPS when `perceptual_weights` is a local file; written to `folder`/tokenizer_stats.json.
    A datamodule without image batches (cached latents) has nothing to reconstruct: None."""
    batches = data.val_dataloader()
    first = next(iter(batches), None)
    if not isinstance(first, (list, tuple)) or not torch.is_tensor(first[0]) or first[0].dim() != 4:
        return None
    evaluator = None
    if feature_extractor is not None:
        from scalegen.eval.metrics import reference_from_images
        empty = reference_from_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "unused")  # features only
        evaluator = Evaluator(empty, ["fid"], feature_extractor, weights=weights, cache_dir=cache_dir)
    perceptual = None
    if perceptual_weights:
        from scalegen.tokenizers.losses import Perceptual
        perceptual = Perceptual(perceptual_weights).to(next(tokenizer.parameters()).device)
    stats = evaluate_tokenizer(tokenizer, batches, evaluator, perceptual)
    path = write(stats, folder)
    print(f"[scalegen] tokenizer on the validation split: PSNR {stats['psnr']:.2f} dB, SSIM {stats['ssim']:.4f}"
          + (f", rFID {stats['rfid']:.2f}" if stats["rfid"] is not None else "") + f" -> {path}")
    return path
