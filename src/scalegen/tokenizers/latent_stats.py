"""Measure a tokenizer's latent statistics on a dataset: the scale factor (1 / std) of a KL VAE, computed, not guessed.

    python -m scalegen.tokenizers.latent_stats tokenizer=kl16 tokenizer_ckpt=kl16.ckpt data=imagefolder \
        data.root=/data/imagenet data.image_size=256 [max_batches=200]

(any `train.py` override selects the tokenizer and the data). It prints the mean and std of the latent the
generator would see (posterior samples for `latent: sample`, without any scale) and `scale_factor = 1 / std`, MAR's
convention for 0.2325 (MAR issues #2, #100: std of `vae.encode(x).sample()` over ImageNet, no shift applied).
With `tokenizer.scale_factor: null`, train.py runs the same measurement on its training data after the tokenizer
stage and writes the value into the run's config.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from scalegen.build import build_tokenizer
from scalegen.io import resolve_path


@torch.no_grad()
def latent_moments(tokenizer: torch.nn.Module, batches, max_batches: int | None = None,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean and std over every latent element of up to `max_batches` (images, labels) batches.

    For a KL VAE sampling its posterior, the moments of the samples are computed exactly from the posterior
    (E[z] = E[mean], E[z^2] = E[mean^2] + E[std^2]): no noise is drawn, the result is reproducible.
    """
    total = total_sq = 0.0
    count = 0
    kl = tokenizer.stochastic
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(batch, dict):
            raise ValueError("the latent scale is measured on images, not on cached latents: set tokenizer.scale_factor")
        images = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device).float()
        if kl:
            post = tokenizer.posterior(images)
            mean = post.mean.double()
            second = mean.square() + (post.std.double().square() if tokenizer.latent == "sample" else 0.0)
        else:  # a VQ tokenizer's continuous latent
            mean = tokenizer.encode(images).double()
            second = mean.square()
        total += mean.sum().item()
        total_sq += second.sum().item()
        count += mean.numel()
    if count == 0:
        raise ValueError("no batches to measure the latent on")
    mu = total / count
    std = max(total_sq / count - mu * mu, 0.0) ** 0.5
    return {"mean": mu, "std": std, "scale_factor": 1.0 / std if std > 0 else float("inf"), "elements": count}


def measure_scale_factor(cfg, data, tokenizer_ckpt: str | None, max_batches: int = 200) -> dict[str, float]:
    """Build the configured tokenizer (weights from `tokenizer_ckpt`) and measure it on `data`'s training set."""
    from omegaconf import OmegaConf


    tok_cfg = OmegaConf.merge(cfg, {"tokenizer": {"scale_factor": 1.0}}) if "scale_factor" in cfg.tokenizer else cfg
    tokenizer = build_tokenizer(tok_cfg, tokenizer_ckpt).eval()
    return latent_moments(tokenizer, data.train_dataloader(), max_batches)


def resolve_scale_factor(cfg, data, tokenizer_ckpt: str | None, out: Path | None = None) -> None:
    """`tokenizer.scale_factor: null` -> measured on the training data, set in `cfg` (and the run's config.yaml)."""
    if "scale_factor" not in cfg.tokenizer or cfg.tokenizer.scale_factor is not None:
        return
    stats = measure_scale_factor(cfg, data, tokenizer_ckpt)
    if not 0 < stats["scale_factor"] < float("inf"):
        raise ValueError(f"tokenizer.scale_factor: the measured latent std is {stats['std']}; set it by hand")
    cfg.tokenizer.scale_factor = float(stats["scale_factor"])
    print(f"[scalegen] tokenizer latent: mean {stats['mean']:.4f}, std {stats['std']:.4f} over {stats['elements']:,} "
          f"values -> tokenizer.scale_factor={cfg.tokenizer.scale_factor:.6g}")
    if out is not None:
        from omegaconf import OmegaConf
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate


    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    max_batches = 200
    for a in list(args):
        if a.startswith("max_batches="):
            max_batches = int(a.split("=", 1)[1])
            args.remove(a)
    config_dir = Path(__file__).resolve().parents[3] / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=args)
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    ckpt = resolve_path(cfg.get("tokenizer_ckpt"))
    if ckpt is None:
        print("warning: no tokenizer_ckpt given: measuring a randomly initialised tokenizer")
    stats = measure_scale_factor(cfg, data, ckpt, max_batches)
    print(f"latent mean {stats['mean']:.6f}  std {stats['std']:.6f}  ({stats['elements']:,} values, "
          f"{max_batches} batches at most)")
    print(f"tokenizer.scale_factor={stats['scale_factor']:.6g}")


if __name__ == "__main__":
    main()
