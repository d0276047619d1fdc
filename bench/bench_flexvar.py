"""FlexVAR-d16 on this machine: a training step, sampling one 256 px image in 10 and in 13 steps, the decode, memory.

    python bench/bench_flexvar.py [--threads 2] [--repeats 3] [--only train,sample10,sample13,decode]

Random weights, fp32, CPU. Each measurement runs in its own process (clean peak RSS), one warm-up then the median
of --repeats. The training step is forward + backward at batch 2 on the fixed 10-scale list without the optimizer
step; sampling uses inference_c2i.py's settings (cfg 4 LlamaGen-style, top-k 900, top-p 0.95, the official greedy
fallback). The official column is the official FlexVAR code, timed the same way on a 2-core machine like this one
(two passes where two figures are given; its 13-step sampling was not timed).
"""
from __future__ import annotations

import torch
from _harness import Row, build, main, train_step  # bench/ is on sys.path when run as a script

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


MEASUREMENTS = {"train": lambda: train_step("flexvar_d16"), "sample10": lambda: sample(10),
                "sample13": lambda: sample(13), "decode": decode}

ROWS = [
    Row("train fwd+bwd, batch 2, 10 scales, L=680", "train", official=(16.3, 16.6), official_rss_mb=4817),
    Row("sample 1 image 256 px, 10 steps, cfg 4, top-k 900, top-p 0.95 (incl. decode)", "sample10",
        official=(11.9, 11.0)),
    Row("sample 1 image 256 px, 13 steps (L=981; 7, 9, 12, 14 greedy), same settings", "sample13"),
    Row("of which FlexVAE decode (16x16 tokens)", "decode", official=3.0),
]

if __name__ == "__main__":
    main(__doc__, "FlexVAR-d16 (315,561,936 params)", MEASUREMENTS, ROWS)
