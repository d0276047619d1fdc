"""VAR-d16 shape on this machine: training step, sampling one 256 px image with CFG, peak memory.

    python bench/bench_var.py [--threads 2] [--repeats 3]

Random weights, fp32, CPU. Each measurement runs in its own process (clean peak RSS), one warm-up then the
median of --repeats. The training step is forward + backward at batch 2 without the optimizer step, as in
../shared/reference/BASELINES.md, whose figures for the official code are printed beside ours.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from _harness import build, timed  # noqa: E402  (bench/ is on sys.path when run as a script)

# official code on a 2-core machine like this one (BASELINES.md): train fwd+bwd batch 2, sample 1 image, peak RSS
OFFICIAL = {"train": (18.8, 20.3), "sample": (11.2, 11.3), "rss_train_mb": 5047}


def measure(kind: str, repeats: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    tokenizer, generator, composition = build("var_d16")
    if kind == "train":
        generator.train()
        B, L = 2, composition.scales.num_tokens
        labels = torch.randint(0, 1000, (B,))
        inputs = torch.randn(B, L - 1, composition.token_dim)
        targets = torch.randint(0, composition.vocab_size, (B, L))

        def step():
            logits = generator(labels, inputs)
            loss, _ = generator.head.loss(logits, targets, composition.scales.offsets)
            loss.backward()
            generator.zero_grad(set_to_none=True)
        times = timed(step, repeats)
    elif kind == "sample":
        from scalegen.generation.loop import generate
        generator.eval()

        def sample():
            g = torch.Generator().manual_seed(0)
            latent = generate(generator.backbone, generator.head, composition, torch.tensor([207]), cfg=1.5, top_k=900,
                              top_p=0.96, generator=g)
            composition.decode(latent)
        times = timed(sample, repeats)
    elif kind == "decode":
        latent = torch.randn(1, composition.token_dim, 16, 16)
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
    print(f"VAR-d16 (310,283,520 params), fp32 CPU, {args.threads} threads, median of {args.repeats} after 1 warm-up\n")
    print("| measurement | scalegen (s) | official (s, BASELINES.md) | scalegen peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    print(f"| train fwd+bwd, batch 2, L=680 | {res['train']['median_s']:.2f} | {OFFICIAL['train'][0]} / {OFFICIAL['train'][1]} "
          f"| {res['train']['peak_rss_mb']:,.0f} (official {OFFICIAL['rss_train_mb']:,}) |")
    print(f"| sample 1 image 256 px, cfg 1.5, top-k 900, top-p 0.96 (incl. decode) | {res['sample']['median_s']:.2f} | "
          f"{OFFICIAL['sample'][0]} / {OFFICIAL['sample'][1]} | {res['sample']['peak_rss_mb']:,.0f} |")
    print(f"| of which VQVAE decode | {res['decode']['median_s']:.2f} | 3.4 | {res['decode']['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
