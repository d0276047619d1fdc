"""What `sample.py` does: draw images for a list of labels in batches and write them out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.utils as vutils
from omegaconf import DictConfig
from PIL import Image

from .build import resolve_path
from .pretrained import load_generator


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [0,1] -> (B,H,W,3) uint8, rounded as the ADM reference batches are."""
    return images.mul(255).add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def sample_to_folder(cfg: DictConfig) -> Path:
    module = load_generator(resolve_path(cfg.ckpt), resolve_path(cfg.vae_ckpt), cfg.device)
    labels = list(cfg.labels) if cfg.labels is not None else \
        [c for c in range(module.num_classes) for _ in range(cfg.per_class)]
    bad = [l for l in labels if not 0 <= l < module.num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside 0..{module.num_classes - 1}")
    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    opts = {k: cfg[k] for k in ("cfg", "cfg_schedule", "top_k", "top_p", "more_smooth") if cfg[k] is not None}
    chunks = []
    for start in range(0, len(labels), cfg.batch_size):
        batch = labels[start:start + cfg.batch_size]
        # seeded per batch from (seed, first index): a batch's images do not depend on the batches before it
        images = module.generate(batch, seed=cfg.seed * 1_000_003 + start, use_ema=cfg.use_ema, **opts)
        arr = to_uint8(images)
        if cfg.save_png:
            for i, (img, label) in enumerate(zip(arr, batch)):
                Image.fromarray(img).save(out / "images" / f"{start + i:06d}_class{label}.png")
        chunks.append(arr)
        print(f"[scalegen] {start + len(batch)}/{len(labels)} images")
    arr = np.concatenate(chunks)
    np.savez(out / "samples.npz", arr_0=arr, labels=np.asarray(labels))
    nrow = cfg.per_class if cfg.labels is None else min(len(labels), 10)
    vutils.save_image(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255, out / "grid.png", nrow=nrow, padding=1, pad_value=1.0)
    print(f"[scalegen] wrote {len(arr)} images, {out / 'grid.png'} and {out / 'samples.npz'}")
    return out
