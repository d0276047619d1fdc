"""The device check: one command on one GPU, one markdown table (gpu_check.md) in the folder given.

On the device machine (no network; its Python has torch, lightning, timm, einops, safetensors), from the repo root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD/src:/tmp/site && python3 bench/gpu_check.py $OUT

`.whl/` (ignored: `echo /.whl/ >> .git/info/exclude`; the run names it in `carry`) holds the wheels that Python
lacks, all pure Python, made on a machine with network (mamba-ssm's needs torch there: no build isolation):
    pip download --no-deps -d .whl hydra-core==1.3.2 omegaconf==2.3.0
    pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3            # published as a source archive only
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps --no-build-isolation -w .whl \
        mamba-ssm==2.3.2.post1                                            # its Triton kernels, no CUDA extension
(mamba-ssm's package __init__ needs its compiled extension, so scalegen loads the Triton SSD module alone; causal-
conv1d is optional and not carried: the Triton SSD scan then runs after our conv.) torch-fidelity is not needed.

Sections (`--sections`, default all), each a group of rows of the one table:
  cuda      the tests marked `cuda` (tests/test_cuda.py): device placement, sampling per method, FSDP2 save+resume
  golden    every golden file on the device: fp32 (floats within 1e-4, indices equal) and bf16 autocast (max
            |diff|, share of sampled indices that agree); tokenizers stay fp32 under bf16, as in training
  train     VAR-d16, FlexVAR-d16, M-VAR-d16, FlowAR-S: bf16 autocast training steps (fused AdamW) at the largest
            batch up to 64 that fits; images/s, tokens/s, MFU against 989 TFLOP/s (FLOPs of one fwd+bwd counted by
            torch.utils.flop_counter), peak memory; eager vs compile, for each attention mode of ATTENTION
  sample    images/s at batch 64 with each method's guidance (bf16 autocast, decode included)
  mamba     mamba-ssm's Triton kernels vs our scan (bench/check_mamba_gpu.py): equality and speed

`--dry-run` runs every code path on the CPU on tiny models (the digits configs, batch 2, one step, compile with
the eager backend, one golden file per precision) in well under a minute; tests/test_gpu_check.py runs it.
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
from _harness import REPO, config  # bench/ is on sys.path when run as a script

from scalegen.build import build_generator, build_tokenizer
from scalegen.checks import RUN_SAMPLE_KEYS
from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions
from scalegen.scaleout.distributed import compile_generator
from scalegen.training.optim import DEFAULT_OPTIMIZER, build_optimizer, param_groups

PEAK_BF16 = 989e12  # H100/H200 dense bf16 FLOP/s
SECTIONS = ("cuda", "golden", "train", "sample", "mamba")
# (label, overrides of configs/train.yaml): the paper presets, and their tiny digits stand-ins for --dry-run
METHODS = [("VAR-d16", ("experiment=var_d16", "data.root=/unused")),
           ("FlexVAR-d16", ("experiment=flexvar_d16", "data.root=/unused")),
           ("M-VAR-d16", ("experiment=mvar_d16", "data.root=/unused")),
           ("FlowAR-S", ("experiment=flowar_s", "data.root=/unused", "tokenizer_ckpt=/unused"))]
TINY = ("backbone.depth=1", "backbone.width=32", "backbone.num_heads=2")
DRY_METHODS = [("VAR (tiny)", ("model=var", *TINY)), ("FlexVAR (tiny)", ("model=flexvar", *TINY)),
               ("M-VAR (tiny)", ("model=mvar", *TINY)), ("FlowAR (tiny)", ("model=flowar", *TINY, "tokenizer.scale_factor=1", "head.num_steps=2"))]
# attention modes to compare: (label, overrides). FlexAttention trains on CUDA only (torch refuses its CPU backward),
# so a dry run times the dense mask and what `auto` picks on CPU
ATTENTION = [("dense", ("attention=dense",)), ("flex", ("attention=flex",))]
DRY_ATTENTION = [("dense", ("attention=dense",)), ("auto", ("attention=auto",))]
PARITY_FILES = ["tests/test_parity_var.py", "tests/test_parity_flexvar.py", "tests/test_parity_mvar.py",
                "tests/test_parity_flowar.py"]
DRY_GOLDEN = "mvar_tiny"  # the one golden file a dry run compares (the smallest generator golden)


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, section: str, row: str, result: str, figures: str = "") -> None:
        self.rows.append((section, row, result, figures))
        print(f"[gpu_check] {section} | {row} | {result} | {figures}", flush=True)

    def markdown(self, title: str) -> str:
        lines = [f"# {title}", "", "| section | row | result | figures |", "| --- | --- | --- | --- |"]
        lines += [f"| {' | '.join(c.replace('|', '/') for c in row)} |" for row in self.rows]
        return "\n".join(lines) + "\n"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- sections -------------------------------------------------------------------------------------------------------


class Outcomes:
    """A pytest plugin that keeps each test's outcome."""

    def __init__(self):
        self.results: dict[str, tuple[str, str]] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            reason = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                reason = report.longrepr[2]
            elif report.failed:
                reason = str(report.longrepr).strip().splitlines()[-1][:200]
            if report.nodeid not in self.results or report.outcome != "passed":
                self.results[report.nodeid] = (report.outcome, reason)


def run_pytest(args: list[str], *plugins) -> int:
    import pytest
    return int(pytest.main([*args, "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO)], plugins=list(plugins)))


def section_cuda(table: Table, device: torch.device, dry: bool) -> None:
    outcomes = Outcomes()
    run_pytest(["-m", "cuda", str(REPO / "tests" / "test_cuda.py")], outcomes)
    for nodeid, (outcome, reason) in outcomes.results.items():
        table.add("cuda tests", nodeid.split("::", 1)[-1], outcome, reason)
    if not outcomes.results:
        table.add("cuda tests", "tests/test_cuda.py", "none collected")


def section_golden(table: Table, device: torch.device, dry: bool) -> None:
    import _gpu_parity
    for precision in ("fp32", "bf16"):
        _gpu_parity.SETTINGS.update(device=str(device), bf16=precision == "bf16", out=None)
        _gpu_parity.RECORDER.rows.clear()
        run_pytest([*(str(REPO / f) for f in PARITY_FILES), "-m", "parity", *(["-k", DRY_GOLDEN] if dry else [])],
                   _gpu_parity)
        files: dict[str, list[dict]] = {}
        for row in _gpu_parity.RECORDER.rows.values():
            files.setdefault(row["file"], []).append(row)
        for file, rows in sorted(files.items()):
            floats = [r for r in rows if "max_diff" in r]
            worst = max(floats, key=lambda r: r["max_diff"] if r["max_diff"] == r["max_diff"] else 1e30, default=None)
            agree = sum(r.get("agree", 0) for r in rows)
            count = sum(r.get("count", 0) for r in rows)
            errors = [f"{r['quantity']}: {r['error']}" for r in rows if "error" in r]
            figures = (f"max diff {worst['max_diff']:.3g} ({worst['quantity']})" if worst else "no float quantity") + \
                (f"; indices/exact agree {agree}/{count} = {agree / count:.2%}" if count else "")
            if errors:
                result = "error"
                figures += "; " + "; ".join(errors)[:300]
            elif precision == "fp32":
                result = "pass" if (worst is None or worst["max_diff"] <= 1e-4) and agree == count else "FAIL"
            else:
                result = "measured"
            table.add(f"golden {precision} on {device.type}", file, result, figures)


def build(overrides: tuple[str, ...], device: torch.device):
    cfg = config(*overrides)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg).eval().requires_grad_(False).to(device)
    generator, composition = build_generator(cfg, tokenizer, 1000)
    return cfg, tokenizer, generator.to(device), composition


def train_step(generator, composition, batch: int, device: torch.device):
    """One bf16 autocast training step (forward, backward, fused/foreach AdamW) on random latents, as `train.py`."""
    labels = torch.randint(0, 1000, (batch,), device=device)
    latent = torch.randn(batch, composition.token_dim, *composition.scales.final, device=device)
    with torch.no_grad():
        targets = composition.targets(latent)
        inputs = composition.teacher_inputs(targets)
    optimizer = build_optimizer(DEFAULT_OPTIMIZER, param_groups(generator), lr=1e-4)

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = generator(labels, inputs, targets)
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, forward_backward


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def section_train(table: Table, device: torch.device, dry: bool) -> None:
    from torch.utils.flop_counter import FlopCounterMode
    batches = (2,) if dry else (64, 48, 32, 24, 16, 8, 4, 2, 1)
    steps = 1 if dry else 10
    for label, overrides in (DRY_METHODS[:1] if dry else METHODS):  # the same code runs every method: one is dry enough
        for attention, extra in (DRY_ATTENTION if dry else ATTENTION):
            flops = None
            for compiled in (False, True):
                name = f"{label}, {attention}, {'compile' if compiled else 'eager'}"
                try:
                    _, _, generator, composition = build((*overrides, *extra), device)
                    generator.train()
                    if compiled:
                        compile_generator(generator, **({"backend": "eager"} if dry else {}))
                    for batch in batches:
                        try:
                            step, forward_backward = train_step(generator, composition, batch, device)
                            for _ in range(1 if dry else 2):
                                step()  # warm-up (and the compile)
                            break
                        except torch.OutOfMemoryError:
                            step = forward_backward = None
                            generator.zero_grad(set_to_none=True)
                            free(device)
                    else:
                        table.add("train bf16", name, "OOM", "batch 1 does not fit")
                        continue
                    if flops is None:  # counted on the eager model (a compiled graph hides its ops from the counter)
                        counter = FlopCounterMode(display=False)
                        with counter:
                            forward_backward()
                        generator.zero_grad(set_to_none=True)
                        flops = counter.get_total_flops()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(steps):
                        step()
                    sync(device)
                    seconds = (time.perf_counter() - start) / steps
                    tokens = composition.scales.num_tokens
                    table.add("train bf16", name, "ok",
                              f"batch {batch}: {batch / seconds:,.1f} img/s, {batch * tokens / seconds:,.0f} tok/s, "
                              f"MFU {flops / seconds / PEAK_BF16:.1%} ({flops / 1e9:,.4g} GFLOP/step), "
                              f"{peak_memory(device)}")
                except Exception as e:  # one configuration failing must not hide the others
                    table.add("train bf16", name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    traceback.print_exc()
                finally:
                    generator = composition = step = forward_backward = None
                    free(device)


def section_sample(table: Table, device: torch.device, dry: bool) -> None:
    batch, repeats = (2, 1) if dry else (64, 2)
    for label, overrides in (DRY_METHODS if dry else METHODS):
        try:
            cfg, _, generator, composition = build(overrides, device)
            generator.eval()
            sample = {k: v for k, v in (cfg.get("sample") or {}).items() if k not in RUN_SAMPLE_KEYS}
            options = GenerateOptions.of(generator.head, {"cfg_scale": 1.5, **sample})
            labels = torch.arange(batch, device=device) % 1000

            def run():
                g = torch.Generator(device).manual_seed(0)
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                    latent = generate(generator.backbone, generator.head, composition, labels, options, generator=g)
                    return composition.decode(latent)
            if not dry:
                run()  # warm-up
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                images = run()
            sync(device)
            seconds = (time.perf_counter() - start) / repeats
            finite = bool(torch.isfinite(images).all())
            guidance = options.guidance
            table.add("sample bf16", label, "ok" if finite else "non-finite images",
                      f"batch {batch}, cfg {guidance.cfg_scale} ({guidance.cfg_schedule}): {batch / seconds:,.1f} img/s")
        except Exception as e:
            table.add("sample bf16", label, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc()
        finally:
            generator = composition = None
            free(device)


def section_mamba(table: Table, device: torch.device, dry: bool) -> None:
    from check_mamba_gpu import mamba_rows
    shape = dict(d_model=64, length=40, batch=1, repeats=1) if dry else dict(d_model=1024, length=680, batch=2)
    try:
        rows = mamba_rows(str(device), dry_run=dry, **shape)
    except Exception as e:
        table.add("mamba", "mamba-ssm Triton vs our scan", "error", f"{type(e).__name__}: {str(e)[:200]}")
        traceback.print_exc()
        return
    for label, value, tol, unit in rows:
        if tol is None:
            table.add("mamba", label, "timed", f"{value:.3g} {unit}")
        else:
            table.add("mamba", label, "pass" if value <= tol else "FAIL", f"{value:.3g} ({unit}; tol {tol:.3g})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: every code path, well under a minute")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    if set(sections) - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(set(sections) - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on the GPU machine, or --dry-run here")
    device = torch.device("cpu" if args.dry_run else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    table = Table()
    started = time.perf_counter()
    for name in sections:
        t = time.perf_counter()
        {"cuda": section_cuda, "golden": section_golden, "train": section_train, "sample": section_sample,
         "mamba": section_mamba}[name](table, device, args.dry_run)
        table.add("time", name, "done", f"{time.perf_counter() - t:.0f} s")
    what = "dry run, CPU" if args.dry_run else torch.cuda.get_device_name()
    title = f"scalegen device check ({what}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s)"
    (args.out / "gpu_check.md").write_text(table.markdown(title))
    print(f"[gpu_check] table: {args.out / 'gpu_check.md'}")
    failed = [r for r in table.rows if r[2] in ("FAIL", "failed", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
