"""What the regenerate.py scripts share: the command line, putting the official checkout on sys.path at the pinned
commit, comparing a recomputed quantity with the stored one, and writing the new file.

Each `<method>/regenerate.py --repo <official checkout>` rebuilds that method's tiny official models with the
weights and inputs stored in the golden files (how they were drawn is in the folder's README.md), repeats the
official calls the README lists, prints max |new - stored| per quantity and writes the files to `--out`.
No official code is in this repository: clone it yourself at the commit the script names.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def parse(method: str, repo_url: str, commit: str, doc: str, threads: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, type=Path,
                   help=f"a checkout of {repo_url} at {commit} (git clone {repo_url} && git checkout {commit})")
    p.add_argument("--out", type=Path, default=Path(f"golden_{method}"), help="where the new files go")
    p.add_argument("--threads", type=int, default=threads, help="torch intra-op threads (the goldens' count)")
    args = p.parse_args()
    head = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head != commit:
        print(f"warning: {args.repo} is at {head or 'an unknown commit'}, the goldens were made at {commit}")
    sys.path.insert(0, str(args.repo.resolve()))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def stored(method: str, name: str) -> dict:
    return torch.load(HERE / method / name, map_location="cpu", weights_only=True)


def compare(label: str, new, old) -> None:
    """Print max |new - old| over tensors (or nested lists/dicts of them)."""
    if isinstance(old, dict):
        for k in old:
            if k in new:
                compare(f"{label}.{k}", new[k], old[k])
    elif isinstance(old, (list, tuple)) and old and not isinstance(old[0], (int, float)):
        for i, (n, o) in enumerate(zip(new, old)):
            compare(f"{label}[{i}]", n, o)
    elif torch.is_tensor(old):
        n = torch.as_tensor(new)
        diff = (n.double() - old.double()).abs().max().item() if n.numel() else 0.0
        print(f"  {label:<48} {tuple(old.shape)!s:<18} max|diff| {diff:.3g}")


def save(obj: dict, out: Path, name: str) -> None:
    torch.save(obj, out / name)
    print(f"wrote {out / name}")
