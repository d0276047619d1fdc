"""Our Mamba2 scan against mamba-ssm's Triton kernels: equal results (fp32 and bf16) and speed. Part of
bench/gpu_check.py (its "mamba" section); alone, on a CUDA machine with mamba-ssm importable:

    python bench/check_mamba_gpu.py [--d-model 1024] [--length 680] [--batch 2]

Compares, for the M-VAR-d16 mixer shape: our `Mamba2` on the PyTorch chunked scan (backend=torch) vs the same
module on mamba-ssm (backend=mamba_ssm: the Triton SSD scan, fused with causal-conv1d when that is installed),
forward and input/weight gradients in fp32, forward under bf16 autocast; the state carried scale by scale through
`step` against the whole sequence; a tiny M-VAR's sampled tokens with both backends; then the forward and
forward+backward times of each. Exits non-zero when a difference exceeds its tolerance.

`dry_run=True` (CPU) runs every line of it with our scan at another chunk length standing in for mamba-ssm.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from scalegen.generators.mamba2 import Mamba2, choose

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Milliseconds per call, after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats * 1e3


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def mamba_rows(device: str = "cuda", d_model: int = 1024, length: int = 680, batch: int = 2, dry_run: bool = False,
               repeats: int = 10) -> list[tuple[str, float, float | None, str]]:
    """(check, value, tolerance or None for a timing, unit) rows; `dry_run`: CPU, our scan on both sides."""
    dev = torch.device(device)
    other = dict(backend="torch", scan_chunk=16) if dry_run else dict(backend="mamba_ssm")
    name = "ours chunk 16 (dry run)" if dry_run else f"mamba-ssm {choose(True, 'mamba_ssm').name}"
    torch.backends.cuda.matmul.allow_tf32 = False  # compare the scans, not TF32 matmuls
    torch.manual_seed(0)
    ours = Mamba2(d_model, d_state=64, d_conv=4, expand=2, backend="torch").to(dev)
    with torch.no_grad():  # off the init, so D, dt_bias, the norm weight and the conv bias all matter
        for prm in ours.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    theirs = Mamba2(d_model, d_state=64, d_conv=4, expand=2, **other).to(dev)
    theirs.load_state_dict(ours.state_dict())
    u = torch.randn(batch, length, d_model, device=dev)
    rows = []

    def check(label: str, value: float, tol: float) -> None:
        rows.append((f"{label}: ours vs {name}", value, tol, "max abs diff"))

    u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
    y1, y2 = ours(u1), theirs(u2)
    check("forward fp32", diff(y1, y2), 2e-3 * y1.abs().max().item())
    y1.square().mean().backward()
    y2.square().mean().backward()
    check("d input fp32", diff(u1.grad, u2.grad), 2e-3 * u1.grad.abs().max().item())
    worst = max(diff(a.grad, b.grad) / (a.grad.abs().max().item() + 1e-12) for a, b in
                zip(ours.parameters(), theirs.parameters()))
    rows.append((f"d weights fp32 (worst relative): ours vs {name}", worst, 5e-3, "max abs diff / max |grad|"))
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        y1b, y2b = ours(u), theirs(u)
        check("forward bf16 autocast", diff(y1b, y2b), 5e-2 * y1b.float().abs().max().item())
        counts = [s * s for s in VAR_256]
        x = torch.randn(batch, sum(counts), d_model, device=dev)
    with torch.no_grad():
        whole = theirs(x)
        state, outs, start = None, [], 0
        for n in counts:  # the state carried scale by scale, as generation runs it
            out, state = theirs.step(x[:, start:start + n], state)
            outs.append(out)
            start += n
        check("step over the 10 VAR scales vs whole sequence", diff(torch.cat(outs, 1), whole),
              2e-3 * whole.abs().max().item())
    rows.append(("tiny M-VAR sampled tokens differing (count)", tiny_mvar_tokens(dev, other), 0.0, "tokens"))
    for label, fn in (("forward", lambda m: m(u)), ("forward+backward", lambda m: m(u.requires_grad_()).sum().backward())):
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                for who, mixer in (("ours", ours), (name, theirs)):
                    ms = timed(lambda: fn(mixer), dev, repeats)
                    rows.append((f"{label} {str(dtype)[6:]}, {who}", ms, None, "ms"))
    return rows


@torch.no_grad()
def tiny_mvar_tokens(dev: torch.device, other: dict) -> float:
    """A tiny M-VAR generating with our scan and with `other`'s: how many sampled tokens differ."""
    from scalegen.generation.loop import generate
    from scalegen.generation.options import GenerateOptions
    from scalegen.generators import Generator, MambaAdaLNTransformer
    from scalegen.heads import CategoricalHead
    from scalegen.schedule.residual import ResidualComposition
    from scalegen.tokenizers import MultiScaleVQVAE
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4)).to(dev).eval()
    tokens = []
    for backend in ("torch", other["backend"]):
        torch.manual_seed(1)
        bb = MambaAdaLNTransformer(num_classes=10, token_dim=8, scales=(1, 2, 3, 4), depth=2, width=128, num_heads=2,
                                   mamba_backend=backend)
        gen = Generator(bb, CategoricalHead(128, 128, 64)).to(dev).eval()
        seen = []
        options = GenerateOptions.of(gen.head, cfg_scale=1.5, top_k=20)
        generate(gen.backbone, gen.head, ResidualComposition(vae), torch.tensor([3, 7], device=dev), options,
                 generator=torch.Generator(dev).manual_seed(0),
                 inspect=lambda si, k, t: seen.append(t) if k == "idx" else None)
        tokens.append(torch.cat([t.flatten() for t in seen]))
    return float((tokens[0] != tokens[1]).sum())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--length", type=int, default=680)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script compares our scan with mamba-ssm's kernels on CUDA")
        return 2
    rows = mamba_rows("cuda", args.d_model, args.length, args.batch)
    print(f"Mamba2 d_model={args.d_model}, batch {args.batch}, L={args.length}, {torch.cuda.get_device_name()}\n")
    print("| check | value | tolerance |\n| --- | --- | --- |")
    failures = [label for label, value, tol, _ in rows if tol is not None and not value <= tol]
    for label, value, tol, unit in rows:
        print(f"| {label} | {value:.3g} {unit} | {'' if tol is None else f'{tol:.3g}'} |")
    if failures:
        print(f"\nFAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
