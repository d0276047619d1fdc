"""M-VAR-d16 on this machine: the Mamba2 mixer alone, a training step, sampling one 256 px image with CFG, memory.

    python bench/bench_mvar.py [--threads 2] [--repeats 3] [--only mixer,mixer_bwd,train,train_dense,train_ckpt,sample,decode]
                               [--with-var]

Random weights, fp32, CPU, our PyTorch chunked scan (mamba-ssm is never imported here). Each measurement runs in
its own process (clean peak RSS), one warm-up then the median of --repeats. The training step is forward +
backward at batch 2 without the optimizer step, attending within each scale (`attention=auto`: one SDPA call per
scale) and through the L x L block-diagonal mask (`attention=dense`). The official column is the official M-VAR
code, timed the same way on a 2-core machine like this one (two passes where two figures are given): mamba-ssm's
pure-PyTorch reference scan, Mamba2 re-run over the whole prefix at every sampling scale; the mixer alone at batch
1, L=680. On a shared, busy machine absolute times drift: `--with-var` also times our VAR-d16 in the same run,
interleaved, so the M-VAR / VAR ratios can be set beside the official ones.
"""
from __future__ import annotations

import torch
from _harness import Row, main, train_step  # bench/ is on sys.path when run as a script
from bench_var import decode, sample

from scalegen.generators.mamba2 import Mamba2


def mixer(backward: bool):
    """M-VAR-d16's mixer (d_model 1024, d_state 64) on one sequence of the 680 tokens of the 10 scales."""
    torch.manual_seed(0)
    m = Mamba2(1024, d_state=64, d_conv=4, expand=2, backend="torch")
    u = torch.randn(1, 680, 1024, requires_grad=backward)
    return (lambda: m(u).square().mean().backward()) if backward else torch.no_grad()(lambda: m(u))


# ordered so that with --with-var each VAR measurement runs right after its M-VAR one (the same machine load)
MEASUREMENTS = {"mixer": lambda: mixer(False), "mixer_bwd": lambda: mixer(True), "train": lambda: train_step("mvar_d16"),
                "train_dense": lambda: train_step("mvar_d16", 2, "attention=dense"),
                "train_ckpt": lambda: train_step("mvar_d16", checkpointed=True),
                "var_train": lambda: train_step("var_d16"), "sample": lambda: sample("mvar_d16"),
                "var_sample": lambda: sample("var_d16"), "decode": lambda: decode("mvar_d16")}

# the official figures: M-VAR's, then VAR's (for the ratios)
TRAIN, SAMPLE, VAR_TRAIN, VAR_SAMPLE = (32.1, 30.6), (31.8, 28.0), (18.8, 20.3), (11.2, 11.3)

ROWS = [
    Row("Mamba2 mixer alone, forward, batch 1, L=680, d_model=1024", "mixer", official=382, unit="ms"),
    Row("Mamba2 mixer alone, forward + backward", "mixer_bwd", official=2561, unit="ms"),
    Row("train fwd+bwd, batch 2, L=680 (attention per scale)", "train", official=TRAIN, official_rss_mb=12374),
    Row("train fwd+bwd, batch 2, L=680, attention=dense (the L x L mask)", "train_dense", official=TRAIN,
        official_rss_mb=12374),
    Row("train fwd+bwd, batch 2, L=680, activation_checkpointing=true (each block recomputed)", "train_ckpt",
        official=TRAIN, official_rss_mb=12374),
    Row("sample 1 image 256 px, cfg 1.5, top-k 900, top-p 0.96 (incl. decode; ours: state cache, official: prefix "
        "re-scan)", "sample", official=SAMPLE),
    Row("of which VQVAE decode", "decode", official=3.4),
    Row("VAR-d16 train fwd+bwd, same run", "var_train", official=VAR_TRAIN, flag="with-var"),
    Row("VAR-d16 sample 1 image, same run", "var_sample", official=VAR_SAMPLE, flag="with-var"),
    Row("train fwd+bwd: M-VAR-d16 / VAR-d16", "train", official=sum(TRAIN) / sum(VAR_TRAIN), per="var_train",
        flag="with-var"),
    Row("sample 1 image: M-VAR-d16 / VAR-d16", "sample", official=sum(SAMPLE) / sum(VAR_SAMPLE), per="var_sample",
        flag="with-var"),
]

if __name__ == "__main__":
    main(__doc__, "M-VAR-d16 (464,157,184 params)", MEASUREMENTS, ROWS)
