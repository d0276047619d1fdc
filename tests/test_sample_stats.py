"""sample.py's measurements for the speed–quality frontier (in-process, a random tiny model and a 2-step digits
classifier; seconds): sample_stats.json with the settings, images/s, sampling FLOPs/image and the metrics with
their intervals; a bad metric is refused before any drawing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import sample_cfg

from scalegen.commands.sample import sample_to_folder
from scalegen.errors import ConfigError
from scalegen.eval import classifier as digits
from scalegen.eval.flops import sampling_flops_per_image
from scalegen.eval.frontier import read_points

pytestmark = pytest.mark.threads(1)


def config(ckpt: Path, out: Path, **overrides):
    return sample_cfg(ckpt, out, **{"batch_size": 10, **overrides})


def test_sample_stats_for_the_frontier(tiny_ckpt, tmp_path):
    model, info = digits.train_classifier(steps=2, log=lambda *_: None)
    classifier = digits.save_classifier(model, info, tmp_path / "clf.safetensors")
    ev = {"metrics": ["fid", "class_acc"], "classifier": str(classifier), "cache_dir": str(tmp_path / "cache"),
          "bootstrap": 20}
    out = sample_to_folder(config(tiny_ckpt, tmp_path / "a", cfg_scale=2.0, top_k=3, eval=ev))
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["method"] == "var" and stats["options"] == {"cfg_scale": 2.0, "top_k": 3} and stats["num_images"] == 20
    assert stats["images_per_s"] > 0
    from scalegen.pretrained import load_generator
    module = load_generator(str(tiny_ckpt))
    assert stats["sample_flops_per_image"] == sampling_flops_per_image(module, options=module.sampling_options(
        cfg_scale=2.0, top_k=3)) > 0
    m = stats["metrics"]
    assert 0 <= m["class_acc"] <= 1 and m["fid_low"] <= m["fid_high"] and m["fid"] > 0
    # a second setting: the frontier reads both points of the method
    sample_to_folder(config(tiny_ckpt, tmp_path / "b", cfg_scale=1.0, eval=ev))
    points = read_points([tmp_path])
    assert sorted(p.label for p in points) == ["cfg_scale=1.0", "cfg_scale=2.0 top_k=3"]
    assert all("fid" in p.values and "images_per_s" in p.values for p in points)


def test_a_metric_that_cannot_work_is_refused_before_drawing(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="eval.metrics"):
        sample_to_folder(config(tiny_ckpt, tmp_path / "c", eval={"metrics": ["nope"], "reference": str(tmp_path)}))
    assert not (tmp_path / "c" / "images").exists()
