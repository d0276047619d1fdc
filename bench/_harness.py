"""What every bench script shares: a preset built with seeded random weights, one process per measurement (so each
peak RSS is its own), one warm-up then the median of N timed runs, and the markdown table that sets the official
code's figures beside ours.

A bench script declares its measurements (name -> a function that builds what it needs and returns the call to
time) and its table rows (what each row measures and the official code's figure), then calls `main`:

    python bench/bench_<method>.py [--threads 2] [--repeats 3] [--only NAME,...]

`--only` runs just the named measurements and prints their rows (`--only decode --repeats 1` is a quick check).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from hydra import compose, initialize_config_dir

from scalegen.build import build_generator, build_tokenizer

REPO = Path(__file__).resolve().parents[1]


def config(*overrides: str):
    """`configs/train.yaml` with the overrides."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def build(experiment: str, *overrides: str):
    """(tokenizer, generator, composition) of `configs/experiment/<experiment>.yaml`, seeded random weights."""
    cfg = config(f"experiment={experiment}", "data.root=/unused", *overrides)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg).eval().requires_grad_(False)
    generator, composition = build_generator(cfg, tokenizer, 1000)
    return tokenizer, generator, composition


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def train_step(experiment: str, batch: int = 2, *overrides: str, checkpointed: bool = False) -> Callable[[], None]:
    """Forward + backward of a categorical-head preset on random tokens (no optimizer step), teacher-forced;
    `checkpointed`: each block recomputed in backward (what `activation_checkpointing=true` does to a run)."""
    _, generator, composition = build(experiment, *overrides)
    if checkpointed:
        from scalegen.scaleout.distributed import checkpoint_blocks
        checkpoint_blocks(generator.backbone)
    generator.train()
    L = composition.scales.num_tokens
    labels = torch.randint(0, 1000, (batch,))
    inputs = torch.randn(batch, L - 1, composition.token_dim)
    targets = list(torch.randint(0, composition.vocab_size, (batch, L)).split(composition.scales.token_counts, dim=1))

    def step():
        loss, _ = generator(labels, inputs, targets, composition.scales)
        loss.backward()
        generator.zero_grad(set_to_none=True)
    return step


# ---- the table ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row: what it measures, which measurement gives our figure, and the official code's figure for it.

    `official`: seconds (or `unit`) as one number, a tuple of numbers (one per pass), or None (not measured).
    `per`: our figure is the ratio of `measurement` to this measurement (and `official` a ratio too).
    `theirs`: the measurement runs the official code, in this run; its figure is printed as the official one.
    `flag`: the row (and the measurements only it needs) runs only with `--<flag>`; flag "official" takes the path
    of the official repository's checkout (`--official PATH`), whose measurements import the official code from it.
    """

    label: str
    measurement: str
    official: float | tuple[float, ...] | None = None
    official_rss_mb: int | None = None
    unit: str = "s"
    per: str | None = None
    flag: str | None = None
    theirs: bool = False  # the measurement times the official code (--official), not ours

    def needs(self) -> list[str]:
        return [self.measurement] + ([self.per] if self.per else [])


def _figure(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value * 1e3:.0f} ms" if unit == "ms" else f"{value:.2f} s"


def _official(row: Row) -> str:
    if row.official is None:
        return "not measured"
    values = row.official if isinstance(row.official, tuple) else (row.official,)
    return " / ".join(f"{v:.2f}x" if row.per else f"{v:g}" for v in values) + ("" if row.per else f" {row.unit}")


def _table_row(row: Row, res: dict) -> str:
    ours = res[row.measurement]
    if row.theirs:  # the official code timed in this run: its figure goes in the official column
        return f"| {row.label} | | {_figure(ours['median_s'], row.unit)} | {ours['peak_rss_mb']:,.0f} (official code) |"
    if row.per:
        return f"| {row.label} | {_figure(ours['median_s'] / res[row.per]['median_s'], 'x')} | {_official(row)} | |"
    rss = f"{ours['peak_rss_mb']:,.0f}" + (f" (official {row.official_rss_mb:,})" if row.official_rss_mb else "")
    return f"| {row.label} | {_figure(ours['median_s'], row.unit)} | {_official(row)} | {rss} |"


# ---- one process per measurement -----------------------------------------------------------------------------------


def _measure(fn: Callable[[], Callable[[], object]], repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    times = timed(fn(), repeats)
    return {"median_s": statistics.median(times), "times": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


OFFICIAL_ENV = "SCALEGEN_BENCH_OFFICIAL"  # the --official checkout, for the measurements that run the official code


def official_checkout() -> str:
    """The official repository's checkout given with --official (on sys.path from here on)."""
    root = os.environ[OFFICIAL_ENV]
    if root not in sys.path:
        sys.path.insert(0, root)
    return root


def _in_child(script: str, name: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if getattr(args, "official", None):
        env[OFFICIAL_ENV] = str(Path(args.official).resolve())
    proc = subprocess.run([sys.executable, script, "--child", name, "--repeats", str(args.repeats), "--threads",
                           str(args.threads)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"measurement {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(doc: str, title: str, measurements: dict[str, Callable[[], Callable[[], object]]], rows: list[Row]) -> None:
    """Parse the arguments, run each needed measurement in its own process (in the order of `measurements`), and
    print the table. `title` names the model (and its size); `doc` is the script's docstring (its --help)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help=f"comma-separated measurements to run, of: {', '.join(measurements)}")
    for flag in dict.fromkeys(r.flag for r in rows if r.flag):
        if flag == "official":
            p.add_argument("--official", metavar="PATH", help="a checkout of the official repository: also time the "
                           "official code in this run, each measurement in its own process right after ours")
        else:
            p.add_argument(f"--{flag}", action="store_true", help=f"also the rows marked {flag}")
    p.add_argument("--child", choices=list(measurements), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_measure(measurements[args.child], args.repeats, args.threads)))
        return

    only = set(args.only.split(",")) if args.only else set(measurements)
    if only - set(measurements):
        p.error(f"--only: unknown measurement(s) {sorted(only - set(measurements))}; known: {', '.join(measurements)}")
    rows = [r for r in rows if (not r.flag or getattr(args, r.flag.replace("-", "_"))) and set(r.needs()) <= only]
    needed = {name for r in rows for name in r.needs()}
    script = sys.modules["__main__"].__file__
    res = {name: _in_child(script, name, args) for name in measurements if name in needed}

    print(f"{title}, fp32 CPU, {args.threads} threads, median of {args.repeats} after 1 warm-up\n")
    print("| measurement | scalegen | official code (an earlier session; \"this run\": --official) "
          "| scalegen peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(_table_row(row, res))
