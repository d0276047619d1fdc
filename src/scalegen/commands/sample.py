"""What `sample.py` does: draw images for a list of labels and write PNGs, a grid and the ADM evaluator's `.npz`.

At scale (50,000 ImageNet images): the images are cut, in index order, into chunks of `batch_size`; chunk k is
seeded from (seed, its first index), so image i is the same whatever the number of processes; process r of n takes
chunks r, r+n, ...; a chunk whose PNGs are all on disk is skipped, so an interrupted run resumes where it stopped;
the process that finds every PNG written packs the `.npz`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.utils as vutils
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from scalegen.errors import ConfigError
from scalegen.eval.metrics import to_uint8 as to_uint8_nchw
from scalegen.generation.chunks import chunks, generate_chunk, shard_from_env
from scalegen.generation.editing import edit_options
from scalegen.generation.options import GenerateOptions
from scalegen.hub import resolve as resolve_weights
from scalegen.io import atomic_write, resolve_path
from scalegen.pretrained import load_generator

GRID_CLASSES, GRID_PER_CLASS = 10, 8  # the grid shows the first images of the first classes, not all 50,000


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [0,1] -> (B,H,W,3) uint8, rounded as the ADM reference batches are."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).cpu().numpy()


# -- the command -------------------------------------------------------------------------------------------------------
def image_name(index: int, label: int) -> str:
    return f"{index:06d}_class{label}.png"


def sampling_labels(cfg: DictConfig, num_classes: int) -> list[int]:
    """`labels`, else `per_class` images of every class (null: 50 for ImageNet-1k, the ADM evaluator's 50,000; 4 else)."""
    if cfg.labels is not None:
        labels = [int(l) for l in cfg.labels]
    else:
        per_class = cfg.per_class if cfg.per_class is not None else (50 if num_classes >= 1000 else 4)
        labels = [c for c in range(num_classes) for _ in range(per_class)]
    bad = [l for l in labels if not 0 <= l < num_classes]
    if bad:
        raise ValueError(f"labels {bad[:10]} are outside 0..{num_classes - 1}")
    return labels


def sampling_options(cfg: DictConfig) -> dict:
    """The sampling keys the config sets (GenerateOptions' fields and every head's; null: the checkpoint's default)."""
    return {k: cfg[k] for k in GenerateOptions.keys() if cfg.get(k) is not None}


def check_sample_config(cfg: DictConfig) -> None:
    """The counts and every sampling option's range, before the checkpoint is read (the keys this model's head
    takes, and top-k against its vocabulary, are checked once it is loaded)."""
    for key, low in (("per_class", 1), ("batch_size", 1)):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{key}: {value!r} must be an integer >= {low}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed: {cfg.seed!r} must be an integer")
    if not isinstance(cfg.use_ema, bool):
        raise ConfigError(f"use_ema: {cfg.use_ema!r} must be true or false")
    try:
        GenerateOptions.check_any_head(sampling_options(cfg))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def pick_device(device: str) -> str:
    """`cuda` under several local processes means each its own GPU (LOCAL_RANK)."""
    if device in ("cuda", "auto"):
        if not torch.cuda.is_available():
            if device == "cuda":
                raise RuntimeError("device=cuda but no GPU is visible; use device=cpu")
            return "cpu"
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return device


def check_manifest(out: Path, manifest: dict) -> None:
    """The settings that decide every image; a resumed run with other settings would mix two sets of images."""
    path = out / "sampling.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            lines = "; ".join(f"{k}: {a!r} on disk, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds images drawn with other settings ({lines}): use another out_dir, or the "
                             "same settings to resume")
    else:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def write_png(array: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def pack(out: Path, labels: Sequence[int], per_row: int) -> Path:
    """samples.npz (arr_0: uint8 NHWC in index order, labels) and grid.png from the PNGs."""
    first = np.asarray(Image.open(out / "images" / image_name(0, labels[0])).convert("RGB"))
    arr = np.empty((len(labels), *first.shape), dtype=np.uint8)  # filled in place: 50k 256px images are 9.8 GB
    for i, label in enumerate(labels):
        arr[i] = np.asarray(Image.open(out / "images" / image_name(i, label)).convert("RGB"))
    labels_arr = np.asarray(labels)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr, labels=labels_arr)

    atomic_write(out / "samples.npz", write)
    classes, count, shown = set(sorted(set(labels))[:GRID_CLASSES]), {}, []
    for i, label in enumerate(labels):
        count[label] = count.get(label, 0) + 1
        if label in classes and count[label] <= GRID_PER_CLASS:
            shown.append(i)
    grid = torch.from_numpy(arr[shown]).permute(0, 3, 1, 2).float() / 255
    vutils.save_image(grid, out / "grid.png", nrow=min(per_row, GRID_PER_CLASS), padding=1, pad_value=1.0)
    return out / "samples.npz"


def sample_to_folder(cfg: DictConfig) -> Path:
    shard, num_shards = shard_from_env(cfg.get("shard"), cfg.get("num_shards"))
    if num_shards > 1 and OmegaConf.is_interpolation(cfg, "out_dir"):
        raise ValueError("several processes share one folder: give out_dir=... (the default folder is named by "
                         "each process's own start time)")
    check_sample_config(cfg)
    module = load_generator(resolve_weights(cfg.ckpt, "ckpt"), resolve_weights(cfg.vae_ckpt, "vae_ckpt"),
                            pick_device(cfg.device))
    labels = sampling_labels(cfg, module.num_classes)
    opts = sampling_options(cfg)
    options = module.sampling_options(**opts)  # a key this model's head does not take is refused before any drawing
    options, hook = edit_options(cfg, module, options)  # `scales` checked before any drawing; image-to-image (`edit`)
    evaluator = sample_evaluator(cfg, module.config or {}, len(labels))  # every metric check before any drawing
    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    check_manifest(out, {"ckpt": str(resolve_path(cfg.ckpt)), "vae_ckpt": resolve_path(cfg.vae_ckpt),
                         "num_images": len(labels), "labels_sha": _digest(labels), "seed": cfg.seed,
                         "batch_size": cfg.batch_size, "use_ema": cfg.use_ema,
                         "options": OmegaConf.to_container(OmegaConf.create(opts), resolve=True),
                         "edit": OmegaConf.to_container(cfg.edit, resolve=True) if cfg.get("edit") else None})

    mine = chunks(len(labels), cfg.batch_size, shard, num_shards)
    todo = [(a, b) for a, b in mine if not all((out / "images" / image_name(i, labels[i])).exists() for i in range(a, b))]
    skipped = sum(b - a for a, b in mine) - sum(b - a for a, b in todo)
    tag = f"shard {shard}/{num_shards}: " if num_shards > 1 else ""
    if skipped:
        print(f"[scalegen] {tag}{skipped} images already on disk, {sum(b - a for a, b in todo)} to draw")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    start_time, drawn, seconds = time.perf_counter(), 0, 0.0
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn()) as progress:
        task = progress.add_task(f"{tag}sampling", total=sum(b - a for a, b in todo))
        for a, b in todo:
            t = time.perf_counter()
            chunk = generate_chunk(module, labels[a:b], a, cfg.seed, cfg.use_ema, options=options, constrain=hook)
            images = to_uint8(chunk)  # on the CPU: the device is done with the chunk
            seconds += time.perf_counter() - t
            for i, img in zip(range(a, b), images):
                path = out / "images" / image_name(i, labels[i])
                if not path.exists():
                    write_png(img, path)
            drawn += b - a
            progress.advance(task, b - a)
    if drawn:
        seconds = time.perf_counter() - start_time
        print(f"[scalegen] {tag}drew {drawn} images in {seconds:.1f} s ({drawn / seconds:.2f} images/s)")
    missing = sum(not (out / "images" / image_name(i, l)).exists() for i, l in enumerate(labels))
    if missing:  # other shards still drawing: the last one to finish packs
        print(f"[scalegen] {tag}done; {missing} images of other shards are not on disk yet, the last shard packs")
        return out
    per_row = len(labels) // len(set(labels)) if cfg.labels is None else 10
    pack(out, labels, per_row)
    print(f"[scalegen] wrote {len(labels)} images, {out / 'grid.png'} and {out / 'samples.npz'}")
    write_sample_stats(cfg, module, options, opts, labels, out, drawn / seconds if drawn else None, num_shards,
                       evaluator)
    return out


def write_sample_stats(cfg: DictConfig, module, options, opts: dict, labels: Sequence[int], out: Path,
                       images_per_s: float | None, num_shards: int, evaluator=None) -> Path:
    """sample_stats.json, one point of the report's speed–quality frontier: the settings, images/s of the generation
    (this process; PNG writing left out), sampling FLOPs per image, and the `eval.metrics` of the images."""
    from scalegen.eval.flops import sampling_flops_per_image
    path = out / "sample_stats.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    config = module.config or {}
    stats = {"ckpt": str(resolve_path(cfg.ckpt)), "method": (config.get("model") or {}).get("name", "official"),
             "options": OmegaConf.to_container(OmegaConf.create(opts), resolve=True), "num_images": len(labels),
             "seed": cfg.seed, "use_ema": cfg.use_ema, "num_shards": num_shards, "device": str(module.device),
             # a run resumed with every image on disk keeps the speed measured when they were drawn
             "images_per_s": images_per_s if images_per_s is not None else old.get("images_per_s"),
             "sample_flops_per_image": sampling_flops_per_image(module, options=options)}
    if evaluator is not None:
        with np.load(out / "samples.npz", allow_pickle=False) as f:
            images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous()
        evaluator.check(len(images), tuple(images.shape[-2:]))
        stats["metrics"] = evaluator.score(evaluator.features(images), torch.as_tensor(list(labels)))
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=1)))
    print(f"[scalegen] sample stats: {path}")
    return path


def sample_evaluator(cfg: DictConfig, config: dict, num_images: int):
    """The Evaluator of `eval.metrics` (None without), checked against `num_images`: `eval.reference=data` is the
    checkpoint's own data (its `eval.reference_split`), else an image folder or an .npz."""
    metrics = list(cfg.eval.metrics or []) if cfg.get("eval") else []
    if not metrics:
        return None
    from hydra.utils import instantiate

    from scalegen.eval import classifier as digits
    from scalegen.eval.metrics import METRICS, Evaluator, reference_from_images, reference_from_path
    ev = cfg.eval
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ConfigError(f"eval.metrics: {bad} are not metrics; allowed: {list(METRICS)}")
    if ev.feature_extractor not in ("digits", "inception"):
        raise ConfigError(f"eval.feature_extractor: {ev.feature_extractor!r} is not one of ['digits', 'inception']")
    if ev.reference == "data":
        if not config.get("data"):
            raise ConfigError("eval.reference=data needs a scalegen checkpoint (it carries its data config): give an "
                              "image folder or an .npz as eval.reference")
        data = instantiate(config["data"])
        data.prepare_data()
        data.setup("fit")
        real, _ = data.real_images(ev.reference_split)
        ref = reference_from_images(to_uint8_nchw(real.add(1).mul(0.5)), f"{type(data).__name__}-{ev.reference_split}")
    else:
        ref = reference_from_path(resolve_path(ev.reference))
    weights = str(digits.ensure_classifier(ev.classifier)[0]) if ev.feature_extractor == "digits" else ev.inception_weights
    try:
        evaluator = Evaluator(ref, metrics, ev.feature_extractor, weights=weights, cache_dir=ev.cache_dir,
                              kid_subset_size=ev.kid_subset_size, bootstrap=ev.bootstrap, seed=ev.seed)
        evaluator.check(num_images)
    except ValueError as e:
        raise ConfigError(f"eval: {e}".replace("callbacks.eval.", "eval.")) from None
    return evaluator


def _digest(values) -> str:
    import hashlib
    return hashlib.sha1(json.dumps(list(values)).encode()).hexdigest()[:16]
