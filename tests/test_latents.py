"""Cached latents: the caching command (flips, moments, shards, several processes, resumable) and training from
the cache without decoding an image (~25 s)."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf, open_dict

from scalegen.build import build_module, build_tokenizer
from scalegen.data import DigitsDataModule
from scalegen.data.latents import LatentsDataModule, LatentShards
from scalegen.io import save_safetensors
from scalegen.scaleout.cache_latents import encode, parse_args, run

SHARD = 64
SMALL = "data.val_fraction=0.9"  # ~180 train images: the cache stays a few seconds of work
pytestmark = pytest.mark.threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Digits encoded by a (random) digits tokenizer with 2 worker processes: (cache root, tokenizer file)."""
    root = tmp_path_factory.mktemp("latents")
    tok = root / "tok.safetensors"
    torch.manual_seed(0)
    save_safetensors(build_tokenizer(compose_cfg()).state_dict(), tok)
    run(parse_args([str(root / "cache"), f"tokenizer_ckpt={tok}", SMALL, "--processes", "2", "--shard-size",
                    str(SHARD), "--batch-size", "128", "--splits", "train", "--quiet"]))
    return root / "cache", tok


def test_cache_layout_flips_and_values(cache):
    root, tok = cache
    images, labels = DigitsDataModule(val_fraction=0.9).real_images("train")
    index = json.loads((root / "train" / "index.json").read_text())
    assert index["kind"] == "latent" and index["num_samples"] == len(labels) == index["num_images"]
    assert [s["count"] for s in index["shards"]] == [SHARD] * (len(labels) // SHARD) + [len(labels) % SHARD]

    first = np.load(root / "train" / index["shards"][0]["latents"], mmap_mode="r")
    assert isinstance(first, np.memmap) and first.shape == (SHARD, 2, 16, 8, 8) and first.dtype == np.float32
    last_labels = np.load(root / "train" / index["shards"][-1]["labels"])
    assert np.array_equal(last_labels, labels[-len(last_labels):].numpy())

    tokenizer = build_tokenizer(compose_cfg(), str(tok))
    pick = [0, 5, SHARD + 3, len(labels) - 1]  # across shards, i.e. across the two worker processes
    with torch.no_grad():
        want = tokenizer.encode(images[pick])
        want_flipped = tokenizer.encode(images[pick].flip(-1))
    dataset = LatentShards(root / "train", flip=False)
    got = torch.stack([dataset[i][0] for i in pick])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    k, j = divmod(pick[2], SHARD)
    stored = np.load(root / "train" / index["shards"][k]["latents"], mmap_mode="r")[j, 1]
    torch.testing.assert_close(torch.from_numpy(np.array(stored)), want_flipped[2], atol=1e-5, rtol=1e-5)


def test_caching_resumes_only_missing_shards(cache, tmp_path):
    root, tok = cache
    copy = tmp_path / "cache"
    os.system(f"cp -r {root} {copy}")
    train = copy / "train"
    before = {p.name: p.stat().st_mtime_ns for p in train.glob("latents_*.npy")}
    (train / "labels_00001.npy").unlink()  # as a kill in the middle of shard 1 leaves it
    (train / "latents_00001.npy").rename(train / ".latents_00001.npy.tmp")
    (train / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        LatentShards(train)
    run(parse_args([str(copy), f"tokenizer_ckpt={tok}", SMALL, "--shard-size", str(SHARD), "--splits", "train",
                    "--quiet"]))
    after = {p.name: p.stat().st_mtime_ns for p in train.glob("latents_*.npy")}
    assert after.keys() == before.keys()
    assert [n for n in after if after[n] != before[n]] == ["latents_00001.npy"]  # only the missing one re-encoded
    assert json.loads((train / "index.json").read_text())["num_samples"] == len(LatentShards(root / "train"))
    with pytest.raises(SystemExit, match="other settings"):  # a cache is never mixed with another configuration
        run(parse_args([str(copy), f"tokenizer_ckpt={tok}", SMALL, "--shard-size", "50", "--splits", "train",
                        "--quiet"]))


def test_kl_tokenizer_caches_moments_and_samples_the_posterior():
    from scalegen.tokenizers.kl import AutoencoderKL

    torch.manual_seed(0)
    tok = AutoencoderKL(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16,
                        enc_attn_resolutions=(), norm_groups=8).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    kind, moments = encode(tok, images)
    assert kind == "moments" and moments.shape == (2, 8, 8, 8)
    torch.manual_seed(1)
    want = tok.encode(images)  # a posterior sample times the scale factor
    torch.manual_seed(1)
    got = tok.latent_from_moments(moments)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(tok.latent_from_moments(moments), want)  # a fresh sample at every step


def test_datamodule_batches_and_training_from_latents_skip_encode(cache, tmp_path):
    root, tok = cache
    data = LatentsDataModule(str(root), batch_size=16, num_workers=0, flip=True)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"latents", "labels"} and batch["latents"].shape == (16, 16, 8, 8)
    loader = data.train_dataloader()
    copies = set()
    for i in loader.sampler:  # the flipped copy is drawn about half the time, seeded per sample
        latents, _ = data.train_set._shard(0)
        if i < SHARD:
            copies.add(tuple(torch.equal(data.train_set[i][0], torch.from_numpy(np.array(latents[i, c])))
                             for c in (0, 1)))
    assert {(True, False), (False, True)} <= copies

    # the module trains on the latents as it would on the images, without calling the tokenizer's encoder
    cfg = compose_cfg("backbone.depth=1", "backbone.width=32", "backbone.num_heads=2", "data.batch_size=4")
    module = build_module(cfg, 10, str(tok))
    module.cond_drop_rate = 0.0
    images, labels = DigitsDataModule(val_fraction=0.9).real_images("train")
    plain = LatentShards(root / "train", flip=False)
    from_latents = {"latents": torch.stack([plain[i][0] for i in range(4)]), "labels": labels[:4]}
    want, _ = module._loss((images[:4], labels[:4]), drop_labels=False)
    module.tokenizer.encode = None  # would fail if called
    got, _ = module._loss(from_latents, drop_labels=False)
    torch.testing.assert_close(got, want)


def test_train_run_from_cache_uses_its_tokenizer(cache, tmp_path):
    from scalegen.commands.train import train

    root, tok = cache
    out = tmp_path / "run"
    cfg = compose_cfg("data=latents", f"data.root={root}", "data.batch_size=8", "data.num_workers=0",
                      "trainer.max_steps=2", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
                      "backbone.depth=1", "backbone.width=32", "backbone.num_heads=2", "sample.per_class=1",
                      f"logger.csv.save_dir={out}", f"callbacks.checkpoint.dirpath={out}/checkpoints",
                      "callbacks.progress=null")
    with open_dict(cfg):
        cfg.output_dir = str(out)
    train(cfg)  # tokenizer_ckpt is null: the cache's own tokenizer is used, no tokenizer training
    assert not (out / "tokenizer.safetensors").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert (out / "samples" / "final.png").is_file()

    bad = compose_cfg("data=latents", f"data.root={root}", "tokenizer.vocab_size=128")
    with pytest.raises(ValueError, match="vocab_size"):
        LatentsDataModule(str(root)).tokenizer_for_run(OmegaConf.to_container(bad.tokenizer, resolve=True), None)
