"""FlowAR-S shape on this machine: training step (incl. the flow loss), sampling one 256 px image with CFG, memory.

    python bench/bench_flowar.py [--threads 2] [--repeats 3]

Random weights, fp32, CPU. Each measurement runs in its own process (clean peak RSS), one warm-up then the
median of --repeats. The training step is forward + backward at batch 2 (the transformer over 341 tokens and the
flow head's loss on every scale) without the optimizer step; sampling is `num_step=25` (24 Euler steps per scale),
cfg 4.3, guidance 0.9, then the KL-16 decode, as in ../shared/reference/BASELINES.md, whose figures for the
official code are printed beside ours.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from _harness import build, timed  # noqa: E402  (bench/ is on sys.path when run as a script)

# official FlowAR-S on a 2-core machine like this one (BASELINES.md): two passes each
OFFICIAL = {"train": (6.9, 6.5), "sample": (22.5, 18.1), "rss_train_mb": 3325, "decode": 2.8}


def measure(kind: str, repeats: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    tokenizer, generator, composition = build("flowar_s", "tokenizer_ckpt=/unused")
    if kind == "train":
        generator.train()
        B = 2
        labels = torch.randint(0, 1000, (B,))
        latent = torch.randn(B, composition.token_dim, *composition.scales.final)
        targets = composition.targets(latent)
        inputs = composition.teacher_inputs(targets)

        def step():
            hidden, cond = generator.backbone(labels, inputs)
            loss, _ = generator.head.training_loss(hidden, cond, targets, composition.scales)
            loss.backward()
            generator.zero_grad(set_to_none=True)
        times = timed(step, repeats)
    elif kind == "sample":
        from scalegen.generation.loop import generate
        generator.eval()

        def sample():
            g = torch.Generator().manual_seed(0)
            latent = generate(generator.backbone, generator.head, composition, torch.tensor([207]), cfg=4.3,
                              cfg_schedule="flowar", generator=g, num_steps=25, guidance=0.9)
            composition.decode(latent)
        times = timed(sample, repeats)
    elif kind == "decode":
        latent = torch.randn(1, composition.token_dim, *composition.scales.final)
        times = timed(lambda: tokenizer.decode(latent), repeats)
    else:
        raise ValueError(kind)
    return {"median_s": statistics.median(times), "times": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.repeats, args.threads)))
        return
    res = {}
    for kind in ("train", "sample", "decode"):
        out = subprocess.run([sys.executable, __file__, "--only", kind, "--repeats", str(args.repeats), "--threads",
                              str(args.threads)], capture_output=True, text=True, check=True)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"FlowAR-S (171,718,072 params) + KL-16, fp32 CPU, {args.threads} threads, median of {args.repeats} after 1 warm-up\n")
    print("| measurement | scalegen (s) | official (s, BASELINES.md) | scalegen peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    print(f"| train fwd+bwd incl. flow loss, batch 2, L=341 | {res['train']['median_s']:.2f} | "
          f"{OFFICIAL['train'][0]} / {OFFICIAL['train'][1]} | {res['train']['peak_rss_mb']:,.0f} "
          f"(official {OFFICIAL['rss_train_mb']:,}) |")
    print(f"| sample 1 image 256 px, num_step 25, cfg 4.3, guidance 0.9 (incl. decode) | {res['sample']['median_s']:.2f} | "
          f"{OFFICIAL['sample'][0]} / {OFFICIAL['sample'][1]} | {res['sample']['peak_rss_mb']:,.0f} |")
    print(f"| of which KL-16 decode | {res['decode']['median_s']:.2f} | {OFFICIAL['decode']} | "
          f"{res['decode']['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
