"""VAR-d16 on this machine: a training step, sampling one 256 px image with CFG, the VQVAE decode, peak memory.

    python bench/bench_var.py [--threads 2] [--repeats 3] [--only train,sample,decode]

Random weights, fp32, CPU. Each measurement runs in its own process (clean peak RSS), one warm-up then the median
of --repeats. The training step is forward + backward at batch 2 without the optimizer step. The official column is
the official VAR code, timed the same way on a 2-core machine like this one (two passes where two figures are given).
"""
from __future__ import annotations

import torch
from _harness import Row, build, main, train_step  # bench/ is on sys.path when run as a script

from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions


def sample(experiment: str = "var_d16"):
    """One image of class 207 with VAR's demo settings (cfg 1.5, top-k 900, top-p 0.96), decode included."""
    _, generator, composition = build(experiment)
    generator.eval()

    def run():
        g = torch.Generator().manual_seed(0)
        options = GenerateOptions.of(generator.head, cfg_scale=1.5, top_k=900, top_p=0.96)
        latent = generate(generator.backbone, generator.head, composition, torch.tensor([207]), options, generator=g)
        composition.decode(latent)
    return run


def decode(experiment: str = "var_d16"):
    """The multi-scale VQVAE's decoder on a 16x16 latent."""
    tokenizer, _, composition = build(experiment)
    latent = torch.randn(1, composition.token_dim, 16, 16)
    return lambda: tokenizer.decode(latent)


MEASUREMENTS = {"train": lambda: train_step("var_d16"), "sample": sample, "decode": decode}

ROWS = [
    Row("train fwd+bwd, batch 2, L=680", "train", official=(18.8, 20.3), official_rss_mb=5047),
    Row("sample 1 image 256 px, cfg 1.5, top-k 900, top-p 0.96 (incl. decode)", "sample", official=(11.2, 11.3)),
    Row("of which VQVAE decode", "decode", official=3.4),
]

if __name__ == "__main__":
    main(__doc__, "VAR-d16 (310,283,520 params)", MEASUREMENTS, ROWS)
