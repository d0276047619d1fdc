"""Official weights by name or Hub id: `ckpt=`, `vae_ckpt=`, `tokenizer_ckpt=`, `init_from=` and the converter take a
local path, `hf://<owner>/<repo>[@revision]/<file>`, or a release name of HUB_FILES (`var_d16`, `vae_var`, `flowar_s`,
…). Files come through huggingface_hub: its cache (HF_HUB_CACHE / HF_HOME), HF_HUB_OFFLINE and local_files_only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from scalegen.errors import ConfigError
from scalegen.io import resolve_path


@dataclass(frozen=True)
class HubFile:
    repo: str | None  # None: not on the Hub (`note` says where it is)
    file: str
    size: int | None = None  # bytes, where known: checked after the download
    sha256: str | None = None
    note: str = ""


def _table() -> dict[str, HubFile]:
    var = "FoundationVision/var"  # VAR README "VAR zoo"; train.py and demo_sample.ipynb wget from it
    flex = "jiaosiyu1999/FlexVAR"  # FlexVAR README, "VAR zoo"
    mvar = "OliverRen/M-VAR"  # M-VAR README "Inference"; file names as gen_img_uncond.py:15 (d32.pth)
    flowar = "OliverRen/FlowAR"  # FlowAR README "Inference" (FlowAR-{S,L,H}.pth in its eval commands)
    t = {"vae_var": HubFile(var, "vae_ch160v4096z32.pth"), "flexvae": HubFile(flex, "FlexVAE.pth")}
    t.update({f"var_d{d}": HubFile(var, f"var_d{d}.pth") for d in (16, 20, 24, 30, 36)})
    t.update({f"mvar_d{d}": HubFile(mvar, f"d{d}.pth") for d in (16, 20, 24, 30, 32)})
    t.update({f"flexvar_d{d}": HubFile(flex, f"FlexVARd{d}-epo{e}.pth") for d, e in ((16, 179), (20, 249), (24, 349))})
    t.update({f"flowar_{s.lower()}": HubFile(flowar, f"FlowAR-{s}.pth") for s in "SLH"})
    t["kl16"] = HubFile(None, "kl16.ckpt", note="MAR's KL-16 VAE is not on the Hub: its repository downloads it from "
                        "Dropbox (python util/download.py in a checkout of LTH14/mar, mar/util/download.py:6-18); "
                        "give the downloaded kl16.ckpt as a path")
    return t


HUB_FILES: dict[str, HubFile] = _table()


def _offline() -> bool:
    constants = huggingface_hub.constants
    return constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE


def fetch(repo: str, file: str, revision: str | None = None, local_files_only: bool = False, key: str = "ckpt") -> str:
    """The local path of `file` of Hub repository `repo`: from the cache, or downloaded unless offline."""
    offline = local_files_only or _offline()
    try:
        return hf_hub_download(repo_id=repo, filename=file, revision=revision, local_files_only=offline)
    except LocalEntryNotFoundError as e:
        why = ("downloads are off (HF_HUB_OFFLINE=1 or local_files_only)" if offline
               else "the Hub could not be reached")
        raise FileNotFoundError(
            f"{key}: {file} of Hub repository {repo} is not in the local Hub cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) and {why}: fetch it where the network is reachable with "
            f"`hf download {repo} {file}{f' --revision {revision}' if revision else ''}` (the same cache), "
            "or give a local path") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{key}: no Hub repository {repo} (or it is private: `hf auth login`)") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{key}: Hub repository {repo} has no file {file}") from e


def parse_hf(spec: str) -> tuple[str, str, str | None]:
    """`hf://owner/repo[@revision]/path/to/file` -> (repo, file, revision)."""
    parts = spec.removeprefix("hf://").split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise ConfigError(f"{spec}: a Hub id is hf://<owner>/<repo>/<file> (optionally <repo>@<revision>)")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", parts[2], revision or None


def check_file(path: str, entry: HubFile) -> None:
    """The downloaded file has the release's size and sha256, where they are known."""
    size = Path(path).stat().st_size
    if entry.size is not None and size != entry.size:
        raise ValueError(f"{path}: {size} bytes, but {entry.file} of {entry.repo} has {entry.size}: an incomplete or "
                         f"other file; remove it from the cache and fetch it again (hf download {entry.repo} {entry.file})")
    if entry.sha256 is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        if h.hexdigest() != entry.sha256:
            raise ValueError(f"{path}: sha256 {h.hexdigest()}, but {entry.file} of {entry.repo} has {entry.sha256}")


def resolve(spec: str | None, key: str = "ckpt", local_files_only: bool = False) -> str | None:
    """A local path for a config value that names weights: a path, an `hf://` id or a release name of HUB_FILES
    (a local file of that name wins)."""
    if not spec:
        return None
    spec = str(spec)
    if spec.startswith("hf://"):
        repo, file, revision = parse_hf(spec)
        return fetch(repo, file, revision, local_files_only, key)
    local = resolve_path(spec)
    if spec in HUB_FILES and not Path(local).exists():
        entry = HUB_FILES[spec]
        if entry.repo is None:
            raise ConfigError(f"{key}={spec}: {entry.note}")
        path = fetch(entry.repo, entry.file, None, local_files_only, key)
        check_file(path, entry)
        return path
    return local
