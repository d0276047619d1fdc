"""The comparison report of a multirun: `python -m scalegen.eval.report <multirun dir> [-o OUT]`.

Reads every run folder of the sweep (config.yaml, metrics.csv and the metrics.attempt*.csv of resumed attempts,
run_stats.json, eval_reference.json, samples/final.png) and writes, into `<multirun dir>/report/` by default:
report.md and report.html (a table with one row per run: parameters, training wall time and throughput, sampling
images/s, FID, KID, precision, recall, class accuracy and the config diff against the first run; the sample grids
side by side; the curves), curves/*.png, grids/*.png, and summary.png (the whole report in one picture).
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# (column, where it comes from, format); `eval/x` = the last logged value of x
COLUMNS = [("params", "stats:params", "params"), ("train wall time", "stats:train_wall_s", "seconds"),
           ("train images/s", "stats:train_images_per_s", "rate"), ("sample images/s", "eval/images_per_s", "rate"),
           ("FID", "eval/fid", "num"), ("KID", "eval/kid", "kid"), ("precision", "eval/precision", "frac"),
           ("recall", "eval/recall", "frac"), ("class acc", "eval/class_acc", "frac")]
CURVES = [("eval/fid", "FID"), ("eval/kid", "KID"), ("eval/precision", "precision"), ("eval/recall", "recall"),
          ("eval/class_acc", "class accuracy")]
IGNORED = ("callbacks.checkpoint.dirpath", "logger.", "output_dir")  # run-folder paths: differ in every run


@dataclass
class Run:
    path: Path
    label: str = ""
    config: dict = field(default_factory=dict)      # flattened: "backbone.depth" -> 2
    overrides: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)        # metrics rows (dicts of floats), attempts first
    reference: dict | None = None
    grid: Path | None = None

    def last(self, key: str) -> float | None:
        values = [r[key] for r in self.rows if key in r]
        return values[-1] if values else None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        points = sorted({r["step"]: r[key] for r in self.rows if key in r and "step" in r}.items())
        return [p[0] for p in points], [p[1] for p in points]

    def value(self, source: str) -> float | None:
        return self.stats.get(source[6:]) if source.startswith("stats:") else self.last(source)


# -- reading ---------------------------------------------------------------------------------------------------------
def find_runs(root: Path) -> list[Path]:
    """The run folders: `root` itself if it is one, else its sub-folders holding config.yaml (by Hydra job number)."""
    if (root / "config.yaml").is_file():
        return [root]
    runs = [p.parent for p in root.rglob("config.yaml") if ".hydra" not in p.parts and "report" not in p.parts]

    def order(p: Path):
        rel = p.relative_to(root).as_posix()
        head = rel.split("_", 1)[0]
        return (int(head), rel) if head.isdigit() else (10**9, rel)

    return sorted(runs, key=order)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def read_csv(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(parsed)
    return rows


def read_run(path: Path) -> Run:
    from omegaconf import OmegaConf
    run = Run(path, label=path.name)
    run.config = flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False))
    overrides = path / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        run.overrides = list(OmegaConf.load(overrides))
    if (path / "run_stats.json").is_file():
        run.stats = json.loads((path / "run_stats.json").read_text())
    if (path / "eval_reference.json").is_file():
        run.reference = json.loads((path / "eval_reference.json").read_text())
    attempts = sorted(path.glob("metrics.attempt*.csv"), key=lambda p: int(p.stem.removeprefix("metrics.attempt") or 0))
    for csv_path in [*attempts, path / "metrics.csv"]:
        if csv_path.is_file():
            run.rows += read_csv(csv_path)
    grid = path / "samples" / "final.png"
    run.grid = grid if grid.is_file() else None
    if "params" not in run.stats:  # trained without callbacks=eval: the count is still in the checkpoint
        params = checkpoint_params(path / "checkpoints" / "last.ckpt")
        if params is not None:
            run.stats["params"] = params
    return run


def checkpoint_params(path: Path) -> int | None:
    """The generator's parameter count from a training checkpoint (its state holds no generator buffers); None for a
    missing file or a sharded folder."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    return sum(v.numel() for k, v in state.items() if k.startswith("generator."))


def label_runs(runs: list[Run]) -> None:
    """A run's label: its overrides that not every run shares (`model=flowar`), else its folder name."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    for r in runs:
        own = [o for o in r.overrides if o not in common]
        r.label = " ".join(own) if own else r.path.name


def config_diff(first: Run, run: Run, compact: bool = False) -> list[str]:
    """`key: value (first: value)` for every differing key; compact: a part whose class differs is one entry
    (`backbone: MambaAdaLNTransformer (first: AdaLNTransformer)`), at most 5 entries."""
    diff = []
    for k in sorted(set(first.config) | set(run.config)):
        a, b = first.config.get(k, "(absent)"), run.config.get(k, "(absent)")
        if a != b and not any(k.startswith(p) for p in IGNORED):
            diff.append((k, a, b))
    if not compact:
        return [f"{k}: {b} (first: {a})" for k, a, b in diff]
    swapped = {k[:-len("._target_")] for k, _, _ in diff if k.endswith("._target_")}
    out = [f"{k[:-len('._target_')]}: {str(b).split('.')[-1]} (first: {str(a).split('.')[-1]})" if k[:-len("._target_")]
           in swapped else f"{k}: {b} (first: {a})" for k, a, b in diff
           if k.endswith("._target_") or not any(k.startswith(f"{g}.") for g in swapped)]
    out.sort(key=lambda e: e.split(":")[0] not in swapped)  # the swapped parts first
    return out[:5] + ([f"+{len(out) - 5} more (see Runs)"] if len(out) > 5 else [])


# -- formatting ------------------------------------------------------------------------------------------------------
def fmt(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "params":
        return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{int(value):,}"
    if kind == "seconds":
        return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"
    if kind == "rate":
        return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"
    if kind == "frac":
        return f"{value:.3f}"
    if kind == "kid":
        return f"{value:.4f}"
    return f"{value:.2f}"


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "method"] + [c[0] for c in COLUMNS] + ["config diff vs the first run"]
    body = []
    for i, r in enumerate(runs):
        diff = "(first run)" if i == 0 else "; ".join(config_diff(runs[0], r, compact=True)) or "(same config)"
        body.append([r.label, str(r.config.get("model.name", "?"))] + [fmt(r.value(src), kind) for _, src, kind in COLUMNS]
                    + [diff])
    ref = next((r.reference for r in runs if r.reference), None)
    if ref:  # the real images scored as samples: what a perfect generator would reach
        m = ref["metrics"]
        values = [m.get(src.split("/", 1)[1]) if src.startswith("eval/") and src != "eval/images_per_s" else None
                  for _, src, _ in COLUMNS]
        body.append([f"real {ref['split']} images ({ref['images']})", "reference point"]
                    + [fmt(v, kind) for v, (_, _, kind) in zip(values, COLUMNS)] + [""])
    return head, body


# -- pictures --------------------------------------------------------------------------------------------------------
def plot_curves(runs: list[Run], out: Path) -> list[tuple[str, Path]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    made = []
    ref = next((r.reference for r in runs if r.reference), None)
    for key, title in [("train/loss", "training loss"), ("val/loss", "validation loss"), *CURVES]:
        if not any(r.series(key)[0] for r in runs):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
        for r in runs:
            steps, values = r.series(key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, ms=3, label=r.label)
        if ref and key.startswith("eval/") and key.split("/", 1)[1] in ref["metrics"]:
            ax.axhline(ref["metrics"][key.split("/", 1)[1]], color="gray", ls=":", label=f"real {ref['split']}")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{key.replace('/', '_')}.png"
        fig.savefig(path)
        plt.close(fig)
        made.append((title, path))
    return made


def summary_png(runs: list[Run], curves: list[tuple[str, Path]], path: Path) -> Path:
    """The report as one picture: the table, the grids side by side, up to three curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    head, body = table(runs)
    head, body = head[:-1], [row[:-1] for row in body]  # the diff column is in the text reports
    grids = [r for r in runs if r.grid]
    shown = [c for c in curves if c[0] in ("training loss", "FID", "class accuracy")][:3]
    rows = [0.5 + 0.25 * len(body)] + ([3.6] if grids else []) + ([2.9] if shown else [])
    fig = plt.figure(figsize=(13, sum(rows) + 0.6), dpi=72)
    spec = fig.add_gridspec(len(rows), 1, height_ratios=rows, hspace=0.12)
    ax = fig.add_subplot(spec[0])
    ax.axis("off")
    tab = ax.table(cellText=body, colLabels=head, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.auto_set_column_width(list(range(len(head))))
    tab.scale(1, 1.3)
    ax.set_title("scalegen comparison report", fontsize=12)
    if grids:
        sub = spec[1].subgridspec(1, len(grids))
        for j, r in enumerate(grids):
            a = fig.add_subplot(sub[j])
            a.imshow(Image.open(r.grid).convert("RGB"))
            a.set_title(r.label, fontsize=8)
            a.axis("off")
    if shown:
        sub = spec[-1].subgridspec(1, len(shown))
        for j, (title, p) in enumerate(shown):
            a = fig.add_subplot(sub[j])
            a.imshow(Image.open(p).convert("RGB"))
            a.axis("off")
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    # a 256-colour palette: the picture is mostly gray samples and flat plots, and a third of the size
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)
    return path


# -- writing ---------------------------------------------------------------------------------------------------------
def build_report(root: str | Path, out: str | Path | None = None) -> Path:
    root = Path(root)
    paths = find_runs(root)
    if not paths:
        raise FileNotFoundError(f"no run folders (with config.yaml) in {root}: give a Hydra multirun folder")
    runs = [read_run(p) for p in paths]
    label_runs(runs)
    out = Path(out) if out else root / "report"
    (out / "grids").mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(runs):
        if r.grid:
            slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", r.label)[:60]
            r.grid = Path(shutil.copyfile(r.grid, out / "grids" / f"{i}_{slug}.png"))
    curves = plot_curves(runs, out / "curves")
    summary_png(runs, curves, out / "summary.png")
    head, body = table(runs)
    rel = lambda p: p.relative_to(out).as_posix()
    notes = [f"{len(runs)} runs of `{root}`.",
             "Metrics are the last evaluation of each run (the EMA weights at the end of training); the last row scores "
             "real held-out images as if generated: the values a perfect generator would reach with as many images."]
    ref = next((r.reference for r in runs if r.reference), None)
    if ref:
        notes.append(f"Feature space: {ref['feature_extractor']}" + (f" (digits classifier, test accuracy "
                     f"{ref['classifier_test_accuracy']:.4f})" if ref.get("classifier_test_accuracy") else "")
                     + f"; reference: {ref['reference']}.")
    incomplete = [r.label for r in runs if not r.stats]
    if incomplete:
        notes.append(f"Without run_stats.json (unfinished, or trained without callbacks=eval): {', '.join(incomplete)}.")

    md = ["# Comparison report", "", *notes, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    grids = [r for r in runs if r.grid]
    if grids:
        md += ["", "## Samples (one row per class)", "", "| " + " | ".join(r.label for r in grids) + " |",
               "|" + "---|" * len(grids), "| " + " | ".join(f"![{r.label}]({rel(r.grid)})" for r in grids) + " |"]
    md += ["", "## Curves", ""] + [f"![{t}]({rel(p)})" for t, p in curves]
    md += ["", "## Runs", ""]
    for i, r in enumerate(runs):
        diff = config_diff(runs[0], r) if i else []
        md += [f"### {r.label}", "", f"- folder: `{r.path}`", f"- overrides: `{' '.join(r.overrides) or '—'}`"]
        md += [f"- config diff vs the first run: " + ("(first run)" if i == 0 else "none" if not diff else "")]
        md += [f"  - `{d}`" for d in diff]
        md += [""]
    (out / "report.md").write_text("\n".join(md))

    e = html.escape
    h = ["<!doctype html><meta charset='utf-8'><title>scalegen comparison report</title>",
         "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:14px}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,td:last-child{text-align:left}"
         ".grids{display:flex;gap:1em;flex-wrap:wrap}figure{margin:0}img{image-rendering:pixelated}</style>",
         "<h1>Comparison report</h1>", *[f"<p>{e(n)}</p>" for n in notes],
         "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body]
    h += ["</table>"]
    if grids:
        h += ["<h2>Samples (one row per class)</h2><div class='grids'>"]
        h += [f"<figure><img src='{e(rel(r.grid))}' width='{2 * _width(r.grid)}'><figcaption>{e(r.label)}"
              "</figcaption></figure>" for r in grids]
        h += ["</div>"]
    h += ["<h2>Curves</h2><div class='grids'>"] + [f"<img src='{e(rel(p))}' alt='{e(t)}'>" for t, p in curves]
    h += ["</div>"]
    (out / "report.html").write_text("\n".join(h))
    print(f"[scalegen] report: {out / 'report.md'}, {out / 'report.html'}, {out / 'summary.png'}")
    return out


def _width(path: Path) -> int:
    from PIL import Image
    with Image.open(path) as im:
        return im.size[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scalegen.eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun", help="a Hydra multirun folder (e.g. multirun/compare/<time>) or one run folder")
    parser.add_argument("-o", "--out", help="output folder (default: <multirun>/report)")
    args = parser.parse_args(argv)
    build_report(args.multirun, args.out)


if __name__ == "__main__":
    main()
