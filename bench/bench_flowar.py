"""FlowAR-S on this machine: a training step (incl. the flow loss), sampling one 256 px image with CFG, the decode,
peak memory.

    python bench/bench_flowar.py [--threads 2] [--repeats 3] [--only train,sample,decode]

Random weights, fp32, CPU. Each measurement runs in its own process (clean peak RSS), one warm-up then the median
of --repeats. The training step is forward + backward at batch 2 (the transformer over 341 tokens and the flow
head's loss on every scale) without the optimizer step; sampling is `num_step=25` (24 Euler steps per scale), cfg
4.3, guidance 0.9, then the KL-16 decode. The official column is the official FlowAR code, timed the same way on a
2-core machine like this one (two passes).
"""
from __future__ import annotations

import torch
from _harness import Row, build, main  # bench/ is on sys.path when run as a script

from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions

PRESET = ("flowar_s", "tokenizer_ckpt=/unused")


def train():
    _, generator, composition = build(*PRESET)
    generator.train()
    labels = torch.randint(0, 1000, (2,))
    latent = torch.randn(2, composition.token_dim, *composition.scales.final)
    targets = composition.targets(latent)
    inputs = composition.teacher_inputs(targets)

    def step():
        hidden, cond = generator.backbone(labels, inputs)
        loss, _ = generator.head.training_loss(hidden, cond, targets, composition.scales)
        loss.backward()
        generator.zero_grad(set_to_none=True)
    return step


def sample():
    _, generator, composition = build(*PRESET)
    generator.eval()

    def run():
        g = torch.Generator().manual_seed(0)
        options = GenerateOptions.of(generator.head, cfg_scale=4.3, cfg_schedule="flowar", num_steps=25, guidance=0.9)
        latent = generate(generator.backbone, generator.head, composition, torch.tensor([207]), options, generator=g)
        composition.decode(latent)
    return run


def decode():
    tokenizer, _, composition = build(*PRESET)
    latent = torch.randn(1, composition.token_dim, *composition.scales.final)
    return lambda: tokenizer.decode(latent)


MEASUREMENTS = {"train": train, "sample": sample, "decode": decode}

ROWS = [
    Row("train fwd+bwd incl. flow loss, batch 2, L=341", "train", official=(6.9, 6.5), official_rss_mb=3325),
    Row("sample 1 image 256 px, num_step 25, cfg 4.3, guidance 0.9 (incl. decode)", "sample", official=(22.5, 18.1)),
    Row("of which KL-16 decode", "decode", official=2.8),
]

if __name__ == "__main__":
    main(__doc__, "FlowAR-S (171,718,072 params) + KL-16", MEASUREMENTS, ROWS)
