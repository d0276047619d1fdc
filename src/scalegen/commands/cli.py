"""The installed commands (`scalegen-train`, `scalegen-sample`, `scalegen-report`, `scalegen-convert`) and the Hydra
mains that `train.py` / `sample.py` at the repository root wrap. `<command> --help` lists the config groups.

The configs are the repository's `configs/` folder, found from this file (an editable install, `pip install -e .`),
so the commands run from any working directory.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs"  # src/scalegen/commands/cli.py -> <repo>/configs

__all__ = ["CONFIGS", "convert_main", "report_main", "sample_main", "train_main"]


def _configs() -> str:
    if not (CONFIGS / "train.yaml").is_file():
        raise SystemExit(f"scalegen: no configs at {CONFIGS}: the commands read the repository's configs/ folder; "
                         "install with `pip install -e <repository>` (editable), not from a wheel")
    return str(CONFIGS)


def _train(cfg: DictConfig) -> None:
    # imported at call time so `--help` and config errors come before the heavy imports (Lightning, the models)
    from scalegen.commands.train import train
    train(cfg)


def _sample(cfg: DictConfig) -> None:
    from scalegen.commands.sample import sample_to_folder  # as in _train: after `--help` and the config checks
    sample_to_folder(cfg)


def report_main(argv: list[str] | None = None) -> None:
    """`scalegen-report`: the comparison report of a multirun folder (scalegen.eval.report)."""
    from scalegen.eval.report import main  # imported at call time: matplotlib and the models only for this command
    main(argv)


def convert_main(argv: list[str] | None = None) -> None:
    """`scalegen-convert`: official releases to scalegen safetensors and back (scalegen.official.convert)."""
    from scalegen.official.convert import main  # imported at call time: the official releases load the model code
    main(argv)


def train_main() -> None:
    """Train a generator (default) or a tokenizer (`task=tokenizer`)."""
    hydra.main(config_path=_configs(), config_name="train", version_base="1.3")(_train)()


def sample_main() -> None:
    """Generate images from a checkpoint: PNGs, a grid, and an .npz (arr_0, uint8 NHWC) for the ADM evaluator."""
    hydra.main(config_path=_configs(), config_name="sample", version_base="1.3")(_sample)()
