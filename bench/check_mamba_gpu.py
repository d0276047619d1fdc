"""On a CUDA machine with the `[mamba]` extra (mamba-ssm + causal-conv1d): do our two Mamba2 paths agree?

    pip install -e '.[mamba]'          # on the GPU machine; builds/downloads mamba-ssm and causal-conv1d
    python bench/check_mamba_gpu.py [--d-model 1024] [--length 680] [--batch 2]

Compares, for the M-VAR-d16 mixer shape (and prints the largest differences and a timing table):
  1. our `Mamba2` on the PyTorch chunked scan (backend=torch) vs the same module on mamba-ssm's fused kernel
     (backend=mamba_ssm: mamba_split_conv1d_scan_combined), forward and input/weight gradients, fp32 and bf16;
  2. `mamba_ssm.Mamba2` itself, loaded strictly with our state dict (the parameter names and shapes are the same);
  3. the state-carrying `step` (our conv + mamba-ssm's chunk scan with initial/final states, as generation runs it)
     over the 10 VAR scales, against the whole-sequence forward;
  4. a tiny M-VAR generation with both backends: the same sampled tokens (fp32).
Exits non-zero when a difference exceeds its tolerance.

NOT RUN YET: the machine this was written on has no GPU, and the task that wrote it was not lent a device
machine, so these numbers have never been produced. The CPU path is what the test suite checks (against the
official code's golden files); this script is the GPU half of that check.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from scalegen.generators.mamba2 import Mamba2, mamba_kernels

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def timed(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--length", type=int, default=680)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script compares the PyTorch path with mamba-ssm's CUDA kernels")
        return 2
    if mamba_kernels() is None:
        print("mamba-ssm / causal-conv1d are not importable here: pip install -e '.[mamba]'")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # compare the scans, not TF32 matmuls
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ours = Mamba2(args.d_model, d_state=64, d_conv=4, expand=2, backend="torch").to(dev)
    with torch.no_grad():  # off the init, so D, dt_bias, the norm weight and the conv bias all matter
        for prm in ours.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    fused = Mamba2(args.d_model, d_state=64, d_conv=4, expand=2, backend="mamba_ssm").to(dev)
    fused.load_state_dict(ours.state_dict())
    u = torch.randn(args.batch, args.length, args.d_model, device=dev)
    failures, rows = [], []

    def check(name: str, value: float, tol: float) -> None:
        rows.append((name, value, tol))
        if not value <= tol:
            failures.append(name)

    # 1. forward and gradients, fp32
    u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
    y1, y2 = ours(u1), fused(u2)
    check("forward fp32: torch scan vs fused kernel", diff(y1, y2), 2e-3 * y1.abs().max().item())
    y1.square().mean().backward()
    y2.square().mean().backward()
    check("d input fp32", diff(u1.grad, u2.grad), 2e-3 * u1.grad.abs().max().item())
    for (n, a), b in zip(ours.named_parameters(), fused.parameters()):
        check(f"d {n} fp32", diff(a.grad, b.grad), 5e-3 * a.grad.abs().max().item() + 1e-8)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y1b, y2b = ours(u), fused(u)
    check("forward bf16 autocast", diff(y1b, y2b), 5e-2 * y1b.float().abs().max().item())

    # 2. mamba_ssm.Mamba2 itself, with our weights
    from mamba_ssm import Mamba2 as Reference
    ref = Reference(args.d_model, d_state=64, d_conv=4, expand=2).to(dev)
    ref.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        check("forward: ours (torch) vs mamba_ssm.Mamba2", diff(ours(u), ref(u)), 2e-3 * y1.abs().max().item())

        # 3. the state carried scale by scale (kernel chunk scan with initial/final states) vs the whole sequence
        counts = [s * s for s in VAR_256]
        x = torch.randn(args.batch, sum(counts), args.d_model, device=dev)
        whole = fused(x)
        for name, mixer in (("torch", ours), ("mamba_ssm", fused)):
            state, outs, start = None, [], 0
            for n in counts:
                out, state = mixer.step(x[:, start:start + n], state)
                outs.append(out)
                start += n
            check(f"step over the 10 scales ({name}) vs fused forward", diff(torch.cat(outs, 1), whole),
                  2e-3 * whole.abs().max().item())

        # 4. a tiny M-VAR: the same tokens with either backend
        from scalegen.generation.loop import generate
        from scalegen.generation.options import GenerateOptions
        from scalegen.generators import Generator, MambaAdaLNTransformer
        from scalegen.heads import CategoricalHead
        from scalegen.schedule.residual import ResidualComposition
        from scalegen.tokenizers import MultiScaleVQVAE
        vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4)).to(dev).eval()
        tokens = {}
        for backend in ("torch", "mamba_ssm"):
            torch.manual_seed(1)
            bb = MambaAdaLNTransformer(num_classes=10, token_dim=8, scales=(1, 2, 3, 4), depth=2, width=128, num_heads=2,
                                       mamba_backend=backend)
            gen = Generator(bb, CategoricalHead(128, 128, 64)).to(dev).eval()
            seen = []
            options = GenerateOptions.of(gen.head, cfg_scale=1.5, top_k=20)
            generate(gen.backbone, gen.head, ResidualComposition(vae), torch.tensor([3, 7], device=dev), options,
                     generator=torch.Generator(dev).manual_seed(0), inspect=lambda si, k, t: seen.append(t) if k == "idx" else None)
            tokens[backend] = torch.cat([t.flatten() for t in seen])
        check("tiny M-VAR sampled tokens differing (count)", float((tokens["torch"] != tokens["mamba_ssm"]).sum()), 0.0)

    print(f"Mamba2 d_model={args.d_model}, batch {args.batch}, L={args.length}, {torch.cuda.get_device_name()}\n")
    print("| check | max abs diff | tolerance |\n| --- | --- | --- |")
    for name, value, tol in rows:
        print(f"| {name} | {value:.3g} | {tol:.3g} |")
    with torch.no_grad():
        t_torch, t_fused = timed(lambda: ours(u)), timed(lambda: fused(u))
    print(f"\n| forward, fp32 | PyTorch chunked scan {t_torch:.2f} ms | mamba-ssm fused kernel {t_fused:.2f} ms |")
    if failures:
        print(f"\nFAILED: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
