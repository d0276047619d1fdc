"""Sampling at scale (in-process, a random tiny model; ~10 s): chunks split over processes give the images of one
process, an interrupted run resumes to the same files, images on disk are skipped, other settings are refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import sample_cfg
from omegaconf import OmegaConf
from PIL import Image

import scalegen.commands.sample as sample
from scalegen.commands.sample import sample_to_folder, sampling_labels
from scalegen.generation.chunks import chunks, shard_from_env

N = 20  # 10 classes x 2, in chunks of 3: 7 chunks, the last one short
pytestmark = pytest.mark.threads(1)


def config(ckpt: Path, out: Path, **overrides):
    return sample_cfg(ckpt, out, **{"batch_size": 3, **overrides})


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def one_process(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    sample_to_folder(config(tiny_ckpt, out))
    return out


def test_chunks_cover_every_image_once_whatever_the_number_of_processes():
    single = chunks(N, 3)
    assert single[0] == (0, 3) and single[-1] == (18, 20)
    for n in (1, 2, 3, 7, 9):
        shards = [chunks(N, 3, r, n) for r in range(n)]
        assert sorted(c for s in shards for c in s) == single  # the same chunks, each exactly once
    with pytest.raises(ValueError, match="shard 2 is outside 0..1"):
        chunks(N, 3, 2, 2)


def test_shard_from_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert shard_from_env() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert shard_from_env() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun first
    assert shard_from_env() == (1, 2)
    assert shard_from_env(0, 5) == (0, 5)  # the config wins


def test_per_class_default_is_50_for_imagenet():
    cfg = OmegaConf.create({"labels": None, "per_class": None})
    labels = sampling_labels(cfg, 1000)
    assert len(labels) == 50_000 and labels[:51] == [0] * 50 + [1]
    assert len(sampling_labels(cfg, 10)) == 40


def test_one_process_writes_pngs_npz_and_grid(one_process):
    names = sorted(files(one_process))
    assert len(set(files(one_process).values())) == N  # random weights, but every image its own: a real check below
    assert names == [f"{i:06d}_class{i // 2}.png" for i in range(N)]
    with np.load(one_process / "samples.npz") as data:
        arr, labels = data["arr_0"], data["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 32, 32, 3) and labels.tolist() == [i // 2 for i in range(N)]
    assert np.array_equal(np.asarray(Image.open(one_process / "images" / names[7]).convert("RGB")), arr[7])
    assert Image.open(one_process / "grid.png").size == (2 * 33 + 1, 10 * 33 + 1)  # one row per class


def test_shards_give_the_files_of_one_process(tiny_ckpt, one_process, tmp_path, capsys):
    out = tmp_path / "sharded"
    for shard in range(3):  # three processes, one after the other; the last one to finish packs
        sample_to_folder(config(tiny_ckpt, out, shard=shard, num_shards=3))
        if shard < 2:
            assert not (out / "samples.npz").exists()
    assert "the last shard packs" in capsys.readouterr().out
    assert files(out) == files(one_process)
    with np.load(out / "samples.npz") as a, np.load(one_process / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_interrupted_run_resumes_to_the_same_files(tiny_ckpt, one_process, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real, calls = sample.generate_chunk, []

    def interrupted(module, labels, start, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while drawing the 4th chunk
        calls.append(start)
        return real(module, labels, start, *args, **kwargs)

    monkeypatch.setattr(sample, "generate_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample_to_folder(config(tiny_ckpt, out))
    assert len(files(out)) == 9 and not (out / "samples.npz").exists()
    (out / "images" / ".000009_class4.png.abc.tmp").write_bytes(b"half a png")  # a write cut short

    calls.clear()
    monkeypatch.setattr(sample, "generate_chunk", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    sample_to_folder(config(tiny_ckpt, out))
    assert calls == [9, 12, 15, 18]  # only the chunks not on disk
    assert files(out) == files(one_process)

    (out / "images" / "000013_class6.png").unlink()  # one image lost: only its chunk is drawn again
    calls.clear()
    sample_to_folder(config(tiny_ckpt, out))
    assert calls == [12] and files(out) == files(one_process)


def test_other_settings_in_the_same_folder_are_refused(tiny_ckpt, one_process, tmp_path):
    cfg = config(tiny_ckpt, tmp_path, shard=0, num_shards=2)
    cfg.out_dir = "${hydra:runtime.output_dir}"  # the default: one folder per process start time
    with pytest.raises(ValueError, match="give out_dir"):
        sample_to_folder(cfg)
    with pytest.raises(ValueError, match=r"seed: 0 on disk, 1 now"):
        sample_to_folder(config(tiny_ckpt, one_process, seed=1))
    with pytest.raises(ValueError, match=r"batch_size: 3 on disk, 4 now"):
        sample_to_folder(config(tiny_ckpt, one_process, batch_size=4))
