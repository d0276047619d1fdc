"""The comparison report of a multirun: `python -m scalegen.eval.report <multirun dir> [-o OUT] [--frontier DIR]`.

Reads every run folder of the sweep (scalegen.eval.runs) and writes, into `<multirun dir>/report/` by default:
report.md and report.html — a table with one row per run (parameters of the generator and the tokenizer, training
FLOPs, images seen, wall time and throughput, sampling images/s and FLOPs/image, FID, KID, precision, recall, class
accuracy, each with its bootstrap interval, and the config diff against the first run); the tokenizers'
reconstruction quality; the across-seed intervals and which differences between runs exceed their uncertainty
(scalegen.eval.comparisons); the scaling fits of a sweep over size (scalegen.eval.scaling); the speed–quality
Pareto fronts of sample.py sweeps (scalegen.eval.frontier); the sample grids side by side; the curves — and
curves/*.png, grids/*.png, and summary.png (the whole report in one picture).
"""
from __future__ import annotations

import argparse
import html
import math
import re
import shutil
from pathlib import Path

from scalegen.eval import figures
from scalegen.eval.bootstrap import CONFIDENCE
from scalegen.eval.comparisons import comparison_table, group_by_seed, seed_table
from scalegen.eval.frontier import SPEED_AXES, by_method, front, plot_fronts, read_points
from scalegen.eval.runs import Run, checkpoint_params, config_diff, find_runs, label_runs, read_csv, read_run  # noqa: F401
from scalegen.eval.scaling import ScalingPoint, fit_all, fit_table, plot_scaling
from scalegen.eval.tokenizer_eval import tokenizer_table

# (column, where it comes from, format); `eval/x` = the last logged value of x (with its interval where logged)
COLUMNS = [("params", "stats:params_generator|params", "params"), ("tokenizer params", "stats:params_tokenizer", "params"),
           ("train FLOPs", "stats:train_flops", "flops"), ("images seen", "stats:images_seen|train_images", "count"),
           ("train wall time", "stats:train_wall_s", "seconds"), ("train images/s", "stats:train_images_per_s", "rate"),
           ("sample images/s", "eval/images_per_s", "rate"), ("sample FLOPs/image", "stats:sample_flops_per_image", "flops"),
           ("FID", "eval/fid", "num"), ("KID", "eval/kid", "kid"), ("precision", "eval/precision", "frac"),
           ("recall", "eval/recall", "frac"), ("class acc", "eval/class_acc", "frac")]
CURVES = [("eval/fid", "FID"), ("eval/kid", "KID"), ("eval/precision", "precision"), ("eval/recall", "recall"),
          ("eval/class_acc", "class accuracy")]


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
    if kind == "flops":
        return f"{value:.3g}"
    if kind == "count":
        return f"{int(value):,}"
    if kind == "frac":
        return f"{value:.3f}"
    if kind == "kid":
        return f"{value:.4f}"
    return f"{value:.2f}"


def cell(run: Run, source: str, kind: str) -> str:
    """A value, and `[low, high]` after it where its bootstrap interval was logged (`eval/fid_low`, ...)."""
    text = fmt(run.value(source), kind)
    low, high = run.last(f"{source}_low"), run.last(f"{source}_high")
    return text if low is None or high is None or text == "—" else f"{text} [{fmt(low, kind)}, {fmt(high, kind)}]"


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "method"] + [c[0] for c in COLUMNS] + ["config diff vs the first run"]
    body = []
    for i, r in enumerate(runs):
        diff = "(first run)" if i == 0 else "; ".join(config_diff(runs[0], r, compact=True)) or "(same config)"
        body.append([r.label, r.method] + [cell(r, src, kind) for _, src, kind in COLUMNS] + [diff])
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
    out.mkdir(parents=True, exist_ok=True)
    made = []
    ref = next((r.reference for r in runs if r.reference), None)
    for key, title in [("train/loss", "training loss"), ("val/loss", "validation loss"), *CURVES]:
        if not any(r.series(key)[0] for r in runs):
            continue
        fig, ax = figures.axes((5, 3.2))
        for r in runs:
            steps, values = r.series(key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, ms=3, label=r.label)
        if ref and key.startswith("eval/") and key.split("/", 1)[1] in ref["metrics"]:
            ax.axhline(ref["metrics"][key.split("/", 1)[1]], color="gray", ls=":", label=f"real {ref['split']}")
        ax.set_xlabel("step")
        ax.set_title(title)
        made.append((title, figures.save(fig, ax, out / f"{key.replace('/', '_')}.png")))
    return made


def summary_png(runs: list[Run], curves: list[tuple[str, Path]], path: Path) -> Path:
    """The report as one picture: the table, the grids side by side, up to three curves."""
    plt = figures.pyplot()
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


# -- sections beyond the main table -----------------------------------------------------------------------------------
Section = tuple[str, list[str], list[tuple[list[str], list[list[str]]]], list[tuple[str, Path]]]  # title, notes, tables, pictures


def tokenizer_section(runs: list[Run]) -> Section | None:
    head, body = tokenizer_table([(r.label, r.tokenizer) for r in runs if r.tokenizer])
    if not body:
        return None
    return ("Tokenizers: reconstruction of the validation split", [
        "PSNR/SSIM on [0, 1] images; rFID: FID of the reconstructions against the originals in the run's feature "
        "space; LPIPS where its weights were given; codebook use: the share of the codebook the split hit, per "
        "scale."], [(head, body)], [])


def error_section(runs: list[Run]) -> Section | None:
    groups = group_by_seed(runs)
    seeds = seed_table(groups)
    head, body, verdicts = comparison_table(groups)
    if not seeds[1] and not any(c != "—" for row in body for c in row[2:]):
        return None
    notes = [f"Intervals are {CONFIDENCE:.0%}. Over samples: the percentile bootstrap of the generated set (callbacks."
             "eval.bootstrap resamples; the reference is fixed), re-centred on the full set's value (resampling "
             "repeats images, which biases FID up and recall down). A difference is beyond its uncertainty (`*`) when the "
             "interval of the difference itself excludes 0 — Welch's t over seeds where both sides have several, else "
             "the difference of the two runs' independent bootstrap replicates (non-overlapping intervals would be a "
             "stricter test than the stated level)."]
    tables = ([seeds] if seeds[1] else []) + [(head, body)]
    return "Error bars and differences", notes + verdicts, tables, []


def scaling_section(runs: list[Run], out: Path) -> Section | None:
    points = [ScalingPoint(r.method, r.label, {"params": r.value("stats:params_generator|params"),
                                               "train_flops": r.value("stats:train_flops"), "loss": r.value("loss"),
                                               "fid": r.last("eval/fid")}) for r in runs]
    fits = fit_all(points, CONFIDENCE)
    if not fits:
        return None
    which = sorted({r.final_loss()[1] for r in runs if r.final_loss()[1]})
    notes = [f"Power laws y = c·x^α fitted per method by least squares on log-log axes (runs of at least 3 sizes); "
             f"the interval is the exponent's {CONFIDENCE:.0%} t interval. Final loss: "
             + " / ".join({"val/loss": "the last validation loss", "train/loss": "the mean of the last 5 logged "
                           "training losses"}[w] for w in which) + "."]
    return "Scaling", notes, [fit_table(fits, CONFIDENCE)], plot_scaling(points, fits, out / "scaling")


def frontier_section(roots: list[Path], out: Path) -> Section | None:
    points = [p for p in read_points(roots) if "fid" in p.values]
    if not points:
        return None
    head = ["method", "settings", "FID", "images/s", "sampling FLOPs/image", "front (images/s)", "front (FLOPs)"]
    body = []
    for method, ps in by_method(points).items():
        masks = [front(ps, "fid", axis, larger) if all(axis in p.values for p in ps) else [False] * len(ps)
                 for axis, _, larger in SPEED_AXES]
        for p, on_speed, on_flops in zip(ps, *masks):
            v = p.values
            body.append([method, p.label, cell_of(v, "fid", "num"), fmt(v.get("images_per_s"), "rate"),
                         fmt(v.get("sample_flops_per_image"), "flops"), "●" if on_speed else "", "●" if on_flops else ""])
    notes = [f"{len(points)} sampling settings (sample.py's sample_stats.json). ● marks each method's Pareto front: "
             "no other setting of the method has a lower FID and a higher speed (or fewer FLOPs)."]
    return "Speed–quality frontier", notes, [(head, body)], plot_fronts(points, out / "frontier")


def cell_of(values: dict, key: str, kind: str) -> str:
    text = fmt(values.get(key), kind)
    low, high = values.get(f"{key}_low"), values.get(f"{key}_high")
    return text if low is None or high is None or text == "—" else f"{text} [{fmt(low, kind)}, {fmt(high, kind)}]"


def render_md(section: Section, rel) -> list[str]:
    title, notes, tables, pictures = section
    md = ["", f"## {title}", ""] + [f"- {n}" if i else n for i, n in enumerate(notes)]
    for head, body in tables:
        md += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return md + [""] + [f"![{t}]({rel(p)})" for t, p in pictures]


def render_html(section: Section, rel) -> list[str]:
    e = html.escape
    title, notes, tables, pictures = section
    h = [f"<h2>{e(title)}</h2>"] + [f"<p>{e(n)}</p>" for n in notes]
    for head, body in tables:
        h += ["<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr>"]
        h += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body] + ["</table>"]
    return h + ["<div class='grids'>"] + [f"<img src='{e(rel(p))}' alt='{e(t)}'>" for t, p in pictures] + ["</div>"]


# -- writing ---------------------------------------------------------------------------------------------------------
def build_report(root: str | Path, out: str | Path | None = None, frontier: list[str | Path] = ()) -> Path:
    """The report of the runs under `root`; `frontier`: sample.py sweep folders (sample_stats.json files) beyond
    those under `root`."""
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
    sections = [s for s in (tokenizer_section(runs), error_section(runs), scaling_section(runs, out),
                            frontier_section([root, *map(Path, frontier)], out)) if s]
    head, body = table(runs)
    rel = lambda p: p.relative_to(out).as_posix()
    notes = [f"{len(runs)} runs of `{root}`.",
             "Metrics are the last evaluation of each run (the EMA weights at the end of training), with their "
             f"{CONFIDENCE:.0%} bootstrap interval over samples where logged; the last row scores "
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
    for section in sections:
        md += render_md(section, rel)
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
    for section in sections:
        h += render_html(section, rel)
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
    parser.add_argument("--frontier", action="append", default=[], metavar="DIR",
                        help="a sample.py -m sweep folder (its sample_stats.json files) for the speed–quality "
                             "frontier; repeatable (those under the multirun folder are read anyway)")
    args = parser.parse_args(argv)
    build_report(args.multirun, args.out, args.frontier)


if __name__ == "__main__":
    main()
