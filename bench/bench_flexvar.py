"""FlexVAR-d16 on this machine: a training step, sampling one 256 px image in 10 and in 13 steps, the decode, memory.

    python bench/bench_flexvar.py [--threads 2] [--repeats 3] [--only train,sample10,sample13,decode] [--official PATH]

Random weights, fp32, CPU. Each measurement runs in its own process (clean peak RSS), one warm-up then the median
of --repeats. The training step is forward + backward at batch 2 on the fixed 10-scale list without the optimizer
step; sampling uses inference_c2i.py's settings (cfg 4 LlamaGen-style, top-k 900, top-p 0.95, the official greedy
fallback). The official column is the official FlexVAR code, timed the same way on a 2-core machine like this one
(two passes where two figures are given; its 13-step sampling was not timed). `--official PATH` (a checkout of
jiaosiyu1999/FlexVAR) also times the official code in this run, right after ours (as bench_var.py does): its FlexVAR
and VQ-16 (V=8912) built as its build_vae_var builds them, with random weights instead of the tokenizer checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from _harness import Row, build, main, official_checkout, train_step  # bench/ is on sys.path when run as a script

from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions
from scalegen.official.flexvar import OFFICIAL_SIDES

STEPS = {10: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 13: (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16)}


def sample(steps: int):
    _, generator, composition = build("flexvar_d16")
    generator.eval()

    def run():
        g = torch.Generator().manual_seed(0)
        options = GenerateOptions.of(generator.head, cfg_scale=4.0, cfg_schedule="constant", cfg_mix="llamagen",
                                     top_k=900, top_p=0.95, scales=STEPS[steps], ratio_steps=9, max_side=16,
                                     trained_sides=OFFICIAL_SIDES)
        codes = generate(generator.backbone, generator.head, composition, torch.tensor([207]), options, generator=g)
        composition.decode(codes)
    return run


def decode():
    """FlexVAE's decoder on 16x16 tokens."""
    tokenizer, _, composition = build("flexvar_d16")
    idx = torch.randint(0, composition.vocab_size, (1, 256))
    return lambda: tokenizer.decode_code(idx, (16, 16))


def official_flexvar():
    """(VQ-16, FlexVAR-d16) of the --official checkout as its build_vae_var makes them, minus the tokenizer
    checkpoint that function insists on: seeded random weights."""
    official_checkout()
    import torch.nn as nn
    from models import FlexVAR, VQ_models  # jiaosiyu1999/FlexVAR's models/__init__.py

    torch.manual_seed(0)
    vae = VQ_models["VQ-16"](codebook_size=8912, codebook_embed_dim=32).eval().requires_grad_(False)
    for cls in (nn.Linear, nn.LayerNorm, nn.Conv2d):  # as build_vae_var does for FlexVAR, whose init_weights sets them
        cls.reset_parameters = lambda self: None
    var = FlexVAR(vae_local=vae, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, drop_rate=0.0,
                  attn_drop_rate=0.0, drop_path_rate=0.1 * 16 / 24, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1,
                  token_dropout_p=0.05, attn_l2_norm=True, patch_nums=STEPS[10], flash_if_available=False,
                  fused_if_available=False)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    return vae, var


def official_train():
    _, var = official_flexvar()
    var.train()
    L = sum(n * n for n in STEPS[10])
    labels, inputs = torch.randint(0, 1000, (2,)), torch.randn(2, L - 1, 32)
    targets = torch.randint(0, 8912, (2 * L,))

    def step():
        F.cross_entropy(var(labels, inputs, STEPS[10]).flatten(0, 1), targets).backward()
        var.zero_grad(set_to_none=True)
    return step


def official_sample():
    vae, var = official_flexvar()
    var.eval()
    return torch.inference_mode()(lambda: var.autoregressive_infer_cfg(
        vqvae=vae, B=1, label_B=torch.tensor([207]), infer_patch_nums=STEPS[10], cfg=4.0, top_k=900, top_p=0.95,
        g_seed=0, more_smooth=False, max_pn=16, used_llamagen_cfg=True))


# ordered so that with --official each official measurement runs right after ours (the same machine load)
MEASUREMENTS = {"train": lambda: train_step("flexvar_d16"), "official_train": official_train,
                "sample10": lambda: sample(10), "official_sample10": official_sample, "sample13": lambda: sample(13),
                "decode": decode}

ROWS = [
    Row("train fwd+bwd, batch 2, 10 scales, L=680", "train", official=(16.3, 16.6), official_rss_mb=4817),
    Row("sample 1 image 256 px, 10 steps, cfg 4, top-k 900, top-p 0.95 (incl. decode)", "sample10",
        official=(11.9, 11.0)),
    Row("sample 1 image 256 px, 13 steps (L=981; 7, 9, 12, 14 greedy), same settings", "sample13"),
    Row("of which FlexVAE decode (16x16 tokens)", "decode", official=3.0),
    Row("train fwd+bwd, batch 2: the official code, this run", "official_train", flag="official", theirs=True),
    Row("sample 1 image, 10 steps (incl. decode): the official code, this run", "official_sample10", flag="official",
        theirs=True),
    Row("train: scalegen / official, this run", "train", per="official_train", flag="official"),
    Row("sample, 10 steps: scalegen / official, this run", "sample10", per="official_sample10", flag="official"),
]

if __name__ == "__main__":
    main(__doc__, "FlexVAR-d16 (315,561,936 params)", MEASUREMENTS, ROWS)
