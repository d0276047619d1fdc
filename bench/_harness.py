"""What every bench script shares: build a preset with random weights, and time a call (1 warm-up, then N runs)."""
from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(experiment: str, *overrides: str):
    """(tokenizer, generator, composition) of `configs/experiment/<experiment>.yaml`, seeded random weights."""
    import torch
    from hydra import compose, initialize_config_dir
    from scalegen.build import build_generator, build_tokenizer

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "data.root=/unused", *overrides])
    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg).eval().requires_grad_(False)
    generator, composition = build_generator(cfg, tokenizer, 1000)
    return tokenizer, generator, composition


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
