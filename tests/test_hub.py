"""Weights by Hub id or release name, through huggingface_hub's cache: a cache built here in the layout it reads
(models--owner--repo/{refs,blobs,snapshots}), offline, so nothing downloads."""
from __future__ import annotations

import hashlib
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import compose_cfg, tiny_module

from scalegen import hub
from scalegen.build import run_config
from scalegen.errors import ConfigError
from scalegen.pretrained import load_generator

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, file: str, data: bytes) -> Path:
    """What `hf download repo file` leaves in the cache: the blob by its hash, the snapshot link, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = root / "snapshots" / COMMIT / file
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return link


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline (HF_HUB_OFFLINE=1)."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return root


def tiny_ckpt_bytes(tmp_path) -> bytes:
    cfg = compose_cfg("backbone.depth=1", "backbone.width=32", "backbone.num_heads=2")
    module = tiny_module()
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "scalegen_config": run_config(cfg)}, path)
    return path.read_bytes()


def test_load_generator_by_hub_id_from_the_cache(cache, tmp_path):
    put_in_cache(cache, "someone/tiny-var", "last.ckpt", tiny_ckpt_bytes(tmp_path))
    module = load_generator("hf://someone/tiny-var/last.ckpt")
    assert module.generator.backbone.class_emb.weight.shape == (11, 32)
    assert hub.resolve("hf://someone/tiny-var@main/last.ckpt").endswith("last.ckpt")


def test_release_name_maps_to_its_repository_and_file(cache):
    entry = hub.HUB_FILES["vae_var"]
    assert (entry.repo, entry.file) == ("FoundationVision/var", "vae_ch160v4096z32.pth")
    put_in_cache(cache, entry.repo, entry.file, b"weights")
    path = hub.resolve("vae_var", "vae_ckpt")
    assert Path(path).read_bytes() == b"weights" and str(cache) in path
    for name in ("var_d16", "flexvar_d24", "mvar_d16", "flowar_s", "flexvae", "kl16"):
        assert name in hub.HUB_FILES


def test_offline_and_not_cached_names_file_repository_and_command(cache):
    with pytest.raises(FileNotFoundError) as e:
        hub.resolve("var_d16", "ckpt")
    msg = str(e.value)
    assert "var_d16.pth" in msg and "FoundationVision/var" in msg and "hf download FoundationVision/var var_d16.pth" in msg
    with pytest.raises(FileNotFoundError, match="hf download someone/x model.pth"):
        hub.resolve("hf://someone/x/model.pth")


def test_size_and_sha256_are_checked_where_known(cache, monkeypatch):
    put_in_cache(cache, "someone/x", "w.pth", b"12345")
    monkeypatch.setitem(hub.HUB_FILES, "x_ok", hub.HubFile("someone/x", "w.pth", 5, hashlib.sha256(b"12345").hexdigest()))
    monkeypatch.setitem(hub.HUB_FILES, "x_bad", hub.HubFile("someone/x", "w.pth", 6))
    assert hub.resolve("x_ok")
    with pytest.raises(ValueError, match="5 bytes, but w.pth of someone/x has 6"):
        hub.resolve("x_bad")


def test_local_paths_pass_through_and_release_without_hub_copy_says_where(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    Path("var_d16").write_bytes(b"local")  # a local file of a release's name wins
    assert Path(hub.resolve("var_d16")).read_bytes() == b"local"
    assert hub.resolve(None) is None
    with pytest.raises(ConfigError, match="vae_ckpt=kl16: .*LTH14/mar"):
        hub.resolve("kl16", "vae_ckpt")
    with pytest.raises(ConfigError, match="hf://<owner>/<repo>/<file>"):
        hub.resolve("hf://only-owner")
