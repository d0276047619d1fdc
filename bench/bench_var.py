"""VAR-d16 on this machine: a training step, sampling one 256 px image with CFG, the VQVAE decode, peak memory.

    python bench/bench_var.py [--threads 2] [--repeats 3] [--only train,sample,decode] [--official PATH]

Random weights, fp32, CPU. Each measurement runs in its own process (clean peak RSS), one warm-up then the median
of --repeats. The training step is forward + backward at batch 2 without the optimizer step. The official column is
the official VAR code, timed the same way on a 2-core machine like this one (two passes where two figures are given).

Absolute times on a shared machine drift by tens of percent between sessions, so a comparison is only fair within
one run: `--official PATH` (a checkout of FoundationVision/VAR) also times the official code here, each of its
measurements in its own process right after ours, built the official way (`build_vae_var(depth=16)`, random
init, no flash/fused kernels: they need CUDA) and run the official way (`forward` + cross-entropy backward at batch 2;
`autoregressive_infer_cfg` with the same settings, decode included), and prints our time over theirs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from _harness import Row, build, main, official_checkout, train_step  # bench/ is on sys.path when run as a script

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


def official_var():
    """The official VAR-d16 from the --official checkout, seeded random weights (its own init)."""
    official_checkout()
    from models import build_vae_var  # FoundationVision/VAR's models/__init__.py

    torch.manual_seed(0)
    vae, var = build_vae_var(device="cpu", depth=16, flash_if_available=False, fused_if_available=False)
    with torch.no_grad():  # build_vae_var leaves the VQVAE uninitialised (a checkpoint is loaded next): NaNs in sampling
        for p in vae.parameters():
            p.normal_(0, 0.02)
    return var


def official_train():
    var = official_var().train()
    labels, inputs = torch.randint(0, 1000, (2,)), torch.randn(2, var.L - 1, var.Cvae)
    targets = torch.randint(0, var.V, (2 * var.L,))

    def step():
        F.cross_entropy(var(labels, inputs).flatten(0, 1), targets).backward()
        var.zero_grad(set_to_none=True)
    return step


def official_sample():
    var = official_var().eval()
    return torch.no_grad()(lambda: var.autoregressive_infer_cfg(B=1, label_B=207, g_seed=0, cfg=1.5, top_k=900,
                                                                 top_p=0.96))


# ordered so that with --official each official measurement runs right after ours (the same machine load)
MEASUREMENTS = {"train": lambda: train_step("var_d16"), "official_train": official_train, "sample": sample,
                "official_sample": official_sample, "decode": decode}

ROWS = [
    Row("train fwd+bwd, batch 2, L=680", "train", official=(18.8, 20.3), official_rss_mb=5047),
    Row("sample 1 image 256 px, cfg 1.5, top-k 900, top-p 0.96 (incl. decode)", "sample", official=(11.2, 11.3)),
    Row("of which VQVAE decode", "decode", official=3.4),
    Row("train fwd+bwd, batch 2: the official code, this run", "official_train", flag="official", theirs=True),
    Row("sample 1 image (incl. decode): the official code, this run", "official_sample", flag="official", theirs=True),
    Row("train: scalegen / official, this run", "train", per="official_train", flag="official"),
    Row("sample: scalegen / official, this run", "sample", per="official_sample", flag="official"),
]

if __name__ == "__main__":
    main(__doc__, "VAR-d16 (310,283,520 params)", MEASUREMENTS, ROWS)
