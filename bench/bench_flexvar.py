"""FlexVAR-d16 shape on this machine: training step, sampling one 256 px image in 10 and in 13 steps, peak memory.

    python bench/bench_flexvar.py [--threads 2] [--repeats 3]

Random weights, fp32, CPU. Each measurement runs in its own process (clean peak RSS), one warm-up then the
median of --repeats. The training step is forward + backward at batch 2 on the fixed 10-scale list without the
optimizer step, and sampling uses inference_c2i.py's settings (cfg 4 LlamaGen-style, top-k 900, top-p 0.95, the
official greedy fallback), as ../shared/reference/BASELINES.md measured the official code; its figures are printed
beside ours (the official 13-step figure was not measured).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from _harness import build, timed  # noqa: E402  (bench/ is on sys.path when run as a script)

# official code on a 2-core machine like this one (BASELINES.md): train fwd+bwd batch 2, sample 1 image (10 steps)
OFFICIAL = {"train": (16.3, 16.6), "sample10": (11.9, 11.0), "decode": 3.0, "rss_train_mb": 4817}
STEPS = {"sample10": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "sample13": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16)}


def measure(kind: str, repeats: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    tokenizer, generator, composition = build("flexvar_d16")
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
    elif kind in STEPS:
        from scalegen.official.flexvar import OFFICIAL_SIDES
        from scalegen.generation.loop import generate
        generator.eval()

        def sample():
            g = torch.Generator().manual_seed(0)
            codes = generate(generator.backbone, generator.head, composition, torch.tensor([207]), cfg=4.0,
                             cfg_schedule="constant", cfg_mix="llamagen", top_k=900, top_p=0.95, generator=g,
                             scales=STEPS[kind], ratio_steps=9, max_side=16, trained_sides=OFFICIAL_SIDES)
            composition.decode(codes)
        times = timed(sample, repeats)
    elif kind == "decode":
        idx = torch.randint(0, composition.vocab_size, (1, 256))
        times = timed(lambda: tokenizer.decode_code(idx, (16, 16)), repeats)
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
    for kind in ("train", "sample10", "sample13", "decode"):
        out = subprocess.run([sys.executable, __file__, "--only", kind, "--repeats", str(args.repeats), "--threads",
                              str(args.threads)], capture_output=True, text=True, check=True)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"FlexVAR-d16 (315,561,936 params), fp32 CPU, {args.threads} threads, median of {args.repeats} after 1 warm-up\n")
    print("| measurement | scalegen (s) | official (s, BASELINES.md) | scalegen peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    print(f"| train fwd+bwd, batch 2, 10 scales, L=680 | {res['train']['median_s']:.2f} | {OFFICIAL['train'][0]} / "
          f"{OFFICIAL['train'][1]} | {res['train']['peak_rss_mb']:,.0f} (official {OFFICIAL['rss_train_mb']:,}) |")
    print(f"| sample 1 image 256 px, 10 steps, cfg 4, top-k 900, top-p 0.95 (incl. decode) | "
          f"{res['sample10']['median_s']:.2f} | {OFFICIAL['sample10'][0]} / {OFFICIAL['sample10'][1]} | "
          f"{res['sample10']['peak_rss_mb']:,.0f} |")
    print(f"| sample 1 image 256 px, 13 steps (L=981; 7, 9, 12, 14 greedy), same settings | "
          f"{res['sample13']['median_s']:.2f} | not measured | {res['sample13']['peak_rss_mb']:,.0f} |")
    print(f"| of which FlexVAE decode (16x16 tokens) | {res['decode']['median_s']:.2f} | {OFFICIAL['decode']} | "
          f"{res['decode']['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
