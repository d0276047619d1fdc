"""M-VAR-d16 shape on this machine: the Mamba2 mixer alone, a training step, sampling one 256 px image with CFG.

    python bench/bench_mvar.py [--threads 2] [--repeats 3] [--with-var]

Random weights, fp32, CPU, our PyTorch chunked scan (mamba-ssm is never imported here). Each measurement runs in
its own process (clean peak RSS), one warm-up then the median of --repeats. The training step is forward +
backward at batch 2 without the optimizer step, as in ../shared/reference/BASELINES.md; the official figures
(mamba-ssm's pure-PyTorch reference scan, Mamba2 re-run over the whole prefix at every scale) are printed beside
ours, and the mixer's from ../shared/reference/MVAR.md sec. 4.4. On a shared, busy machine absolute times drift;
`--with-var` also times our VAR-d16 in the same conditions, so the M-VAR / VAR ratios can be set beside the
official ones (BASELINES.md: training 31.4 / 19.6 = 1.6x, sampling 29.9 / 11.3 = 2.7x).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from _harness import build, timed  # noqa: E402  (bench/ is on sys.path when run as a script)

# official code on a 2-core machine like this one (BASELINES.md; MVAR.md sec. 4.4 for the mixer, batch 1, L=680)
OFFICIAL = {"train": (32.1, 30.6), "sample": (31.8, 28.0), "rss_train_mb": 12374, "decode": 3.4,
            "mixer_fwd_ms": 382, "mixer_fwd_bwd_ms": 2561, "var_train": (18.8, 20.3), "var_sample": (11.2, 11.3)}


def measure(kind: str, repeats: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    if kind in ("mixer", "mixer_bwd"):
        from scalegen.generators.mamba2 import Mamba2
        torch.manual_seed(0)
        mixer = Mamba2(1024, d_state=64, d_conv=4, expand=2, backend="torch")  # M-VAR-d16's mixer
        u = torch.randn(1, 680, 1024, requires_grad=kind == "mixer_bwd")
        if kind == "mixer":
            with torch.no_grad():
                times = timed(lambda: mixer(u), repeats)
        else:
            times = timed(lambda: mixer(u).square().mean().backward(), repeats)
    else:
        tokenizer, generator, composition = build("var_d16" if kind.startswith("var_") else "mvar_d16")
        kind = kind.removeprefix("var_")
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
                latent = generate(generator.backbone, generator.head, composition, torch.tensor([207]), cfg=1.5,
                                  top_k=900, top_p=0.96, generator=g)
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
    p.add_argument("--with-var", action="store_true", help="also time our VAR-d16 in the same conditions")
    p.add_argument("--only", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.repeats, args.threads)))
        return
    res = {}
    kinds = ["mixer", "mixer_bwd", "train", "sample", "decode"]
    if args.with_var:  # interleaved with M-VAR's, so both see the same load
        kinds[2:4] = ["train", "var_train", "sample", "var_sample"]
    for kind in kinds:
        out = subprocess.run([sys.executable, __file__, "--only", kind, "--repeats", str(args.repeats), "--threads",
                              str(args.threads)], capture_output=True, text=True, check=True)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    o = OFFICIAL
    print(f"M-VAR-d16 (464,157,184 params), fp32 CPU, {args.threads} threads, median of {args.repeats} after 1 warm-up\n")
    print("| measurement | scalegen | official (BASELINES.md / MVAR.md) | scalegen peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    print(f"| Mamba2 mixer alone, forward, batch 1, L=680, d_model=1024 | {res['mixer']['median_s'] * 1e3:.0f} ms | "
          f"{o['mixer_fwd_ms']} ms (mamba-ssm chunk ref) | {res['mixer']['peak_rss_mb']:,.0f} |")
    print(f"| Mamba2 mixer alone, forward + backward | {res['mixer_bwd']['median_s'] * 1e3:.0f} ms | {o['mixer_fwd_bwd_ms']} ms | "
          f"{res['mixer_bwd']['peak_rss_mb']:,.0f} |")
    print(f"| train fwd+bwd, batch 2, L=680 | {res['train']['median_s']:.2f} s | {o['train'][0]} / {o['train'][1]} s "
          f"| {res['train']['peak_rss_mb']:,.0f} (official {o['rss_train_mb']:,}) |")
    print(f"| sample 1 image 256 px, cfg 1.5, top-k 900, top-p 0.96 (incl. decode; state cache) | "
          f"{res['sample']['median_s']:.2f} s | {o['sample'][0]} / {o['sample'][1]} s (prefix re-scan) | "
          f"{res['sample']['peak_rss_mb']:,.0f} |")
    print(f"| of which VQVAE decode | {res['decode']['median_s']:.2f} s | {o['decode']} s | {res['decode']['peak_rss_mb']:,.0f} |")
    if args.with_var:
        for kind, what in (("train", "train fwd+bwd"), ("sample", "sample 1 image")):
            ours = res[kind]["median_s"] / res["var_" + kind]["median_s"]
            official = sum(o[kind]) / sum(o["var_" + kind])
            print(f"| {what}: M-VAR-d16 / VAR-d16 (ours, same run: {res['var_' + kind]['median_s']:.2f} s for VAR) | "
                  f"{ours:.2f}x | {official:.2f}x | |")


if __name__ == "__main__":
    main()
