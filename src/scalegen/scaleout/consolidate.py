"""Consolidate a sharded (FSDP2 / DCP) checkpoint folder into one file that `sample.py` and `load_generator` read.

    python -m scalegen.scaleout.consolidate outputs/run/checkpoints/last.ckpt last.full.ckpt [--keep-optimizer]

Lightning's own consolidation script expects FSDP1's layout (a `model` key) and fails on ModelParallelStrategy
folders; `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` reads them. The trainer metadata
(global_step, scalegen_config, ...) comes from the folder's meta.pt. Runs on one process, no GPU.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from scalegen.scaleout.dcp_metadata import check_sharded_folder

META = "meta.pt"


def consolidate(folder: str | os.PathLike, out: str | os.PathLike, keep_optimizer: bool = False) -> Path:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder, out = Path(folder), Path(out)
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder} is not a sharded checkpoint folder (no .metadata); a single-file "
                                "checkpoint needs no consolidation")
    check_sharded_folder(folder)  # torch unpickles `.metadata` with plain pickle: vet it first
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        full = Path(tmp) / "full.pt"
        dcp_to_torch_save(folder, full)
        state = torch.load(full, map_location="cpu", weights_only=True)
    meta = torch.load(folder / META, map_location="cpu", weights_only=True) if (folder / META).is_file() else {}
    checkpoint = {**meta, "state_dict": state["state_dict"]}
    if keep_optimizer:  # keyed by parameter name (DCP's layout), not Lightning's optimizer_states list
        checkpoint.update({k: v for k, v in state.items() if k.startswith("optimizer_")})
    fd, tmp_path = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save(checkpoint, tmp_path)
        os.replace(tmp_path, out)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m scalegen.scaleout.consolidate", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="sharded checkpoint folder (e.g. checkpoints/last.ckpt/ under trainer=fsdp)")
    p.add_argument("out", help="the single-file checkpoint to write")
    p.add_argument("--keep-optimizer", action="store_true", help="also keep the optimizer state (by parameter name)")
    args = p.parse_args(argv)
    out = consolidate(args.folder, args.out, args.keep_optimizer)
    print(f"[scalegen] consolidated {args.folder} -> {out}")


if __name__ == "__main__":
    main()
