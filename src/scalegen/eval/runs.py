"""The run folders of a sweep, read for the report: config, metrics (resumed attempts first), run statistics, the
evaluation's reference point and bootstrap replicates, the tokenizer's evaluation, the final sample grid."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
    replicates: dict = field(default_factory=dict)  # eval_bootstrap.json: {metric: [B values]} of the last evaluation
    tokenizer: dict | None = None                   # tokenizer/tokenizer_stats.json: its reconstruction evaluation

    @property
    def method(self) -> str:
        return str(self.config.get("model.name", "?"))

    @property
    def seed(self):
        return self.config.get("seed")

    def last(self, key: str) -> float | None:
        values = [r[key] for r in self.rows if key in r]
        return values[-1] if values else None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        points = sorted({r["step"]: r[key] for r in self.rows if key in r and "step" in r}.items())
        return [p[0] for p in points], [p[1] for p in points]

    def value(self, source: str) -> float | None:
        """`stats:a|b`: run_stats.json's a, else its b; `loss`: final_loss(); else the last logged value."""
        if source == "loss":
            return self.final_loss()[0]
        if source.startswith("stats:"):
            return next((self.stats[k] for k in source[6:].split("|") if self.stats.get(k) is not None), None)
        return self.last(source)

    def final_loss(self) -> tuple[float | None, str]:
        """(the last validation loss, else the mean of the last 5 logged training losses; which one)."""
        if self.last("val/loss") is not None:
            return self.last("val/loss"), "val/loss"
        train = [r["train/loss"] for r in self.rows if "train/loss" in r][-5:]
        return (sum(train) / len(train), "train/loss") if train else (None, "")


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
    if (path / "eval_bootstrap.json").is_file():
        run.replicates = json.loads((path / "eval_bootstrap.json").read_text())["replicates"]
    for tok in (path / "tokenizer" / "tokenizer_stats.json", path / "tokenizer_stats.json"):
        if tok.is_file():
            run.tokenizer = json.loads(tok.read_text())
            break
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
