"""Options and inputs checked before any compute, naming the key and the allowed range; files that are not what
they are given as say so; 16-bit PNGs decode to the right 8-bit values."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from scalegen.data.imagefolder import ImageFiles


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    wide = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image, _ = ImageFiles([(str(tmp_path / "g16.png"), 0)], transforms.PILToTensor())[0]
    expected = torch.from_numpy(np.rint(wide / 257.0).astype(np.uint8))
    assert image.shape == (3, 32, 32) and all(torch.equal(image[c], expected) for c in range(3))


# ---- config keys and ranges: train.py's config, at composition ---------------------------------------------------
import pytest  # noqa: E402
from conftest import REPO, compose_cfg, tiny_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from scalegen.checks import check_generator_config  # noqa: E402
from scalegen.commands.sample import sample_to_folder  # noqa: E402
from scalegen.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize("overrides, message", [
    (["+model.foo=1"], r"^model\.foo: unknown key"),
    (["+trainer.bar=1"], r"^trainer\.bar: unknown key for Trainer"),
    (["+data.x=1"], r"^data\.x: unknown key for DigitsDataModule"),
    (["+foo=1"], r"^foo: unknown key.*extra"),
    (["+model.init.foo=1"], r"^model\.init\.foo: unknown key"),
    (["+tokenizer_training.foo=1"], r"^tokenizer_training\.foo: unknown key"),
    (["trainer.max_steps=abc"], r"^trainer\.max_steps: 'abc' is not of type int"),
    (["trainer.gradient_clip_val=x"], r"^trainer\.gradient_clip_val: 'x'"),
    (["data.batch_size=-4"], r"^data\.batch_size: -4 must be an integer >= 1"),
    (["model.cond_drop_rate=2"], r"^model\.cond_drop_rate: 2 is not a probability in \[0, 1\]"),
    (["model.ema_decay=1.5"], r"^model\.ema_decay: 1\.5 must be in \[0, 1\)"),
    (["max_nonfinite=0"], r"^max_nonfinite: 0 must be an integer >= 1"),
    (["sample.per_class=0"], r"^sample\.per_class: 0 must be an integer >= 1"),
    (["sample.cfg_scale=-1"], r"^sample\.cfg_scale=-1: needs a number >= 0"),
    (["sample.top_p=2"], r"^sample\.top_p=2: needs a number in \[0, 1\]"),
    (["sample.top_k=-5"], r"^sample\.top_k=-5: needs an integer >= 0"),
    (["sample.top_k=5000"], r"^sample\.top_k=5000: above the vocabulary of 256 codes"),
    (["sample.more_smooth=3"], r"^sample\.more_smooth=3: needs true or false"),
    (["+sample.scales=[0,1]"], r"^sample\.scales: scale sizes must be positive"),
    (["model=flexvar", "sample.ratio_steps=-1"], r"^sample\.ratio_steps=-1: needs an integer >= 0"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("^") else None)
def test_train_config_refused_naming_the_key(overrides, message, tmp_path):
    from scalegen.commands.train import train
    cfg = compose_cfg(*overrides, f"+output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder, the data or any model


def test_extra_is_the_free_namespace():
    check_generator_config(compose_cfg("+extra.sweep_tag=lr_high", "+extra.note=hello"))


# ---- sample.py: before the checkpoint is read, then against the model's head --------------------------------------
def sample_cfg(ckpt, out, **overrides):
    cfg = OmegaConf.load(REPO / "configs" / "sample.yaml")
    cfg.pop("hydra")
    cfg.merge_with({"ckpt": str(ckpt), "out_dir": str(out), "per_class": 1, "batch_size": 4, **overrides})
    return cfg


@pytest.mark.parametrize("override, message", [
    ({"per_class": 0}, r"^per_class: 0 must be an integer >= 1"),
    ({"batch_size": -2}, r"^batch_size: -2 must be an integer >= 1"),
    ({"cfg_scale": -1}, r"^cfg_scale=-1: needs a number >= 0"),
    ({"top_p": 2}, r"^top_p=2: needs a number in \[0, 1\]"),
    ({"top_k": -5}, r"^top_k=-5: needs an integer >= 0"),
    ({"more_smooth": 3}, r"^more_smooth=3"),
    ({"num_steps": 0}, r"^num_steps=0: needs an integer >= 1"),
    ({"guidance": 2.0}, r"^guidance=2.0: the guidance interval"),
    ({"scales": [0, 2]}, r"^scales=\[0, 2\]"),
], ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else None)
def test_sample_options_refused_before_the_checkpoint_is_read(tmp_path, override, message):
    missing = tmp_path / "never_read.ckpt"  # reaching the load would say "checkpoint not found" instead
    with pytest.raises(ConfigError, match=message):
        sample_to_folder(sample_cfg(missing, tmp_path / "out", **override))
    assert not (tmp_path / "out").exists()


def test_top_k_above_the_models_vocabulary_is_refused(tmp_path):
    torch.manual_seed(0)
    module = tiny_module()
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "scalegen_config": module.config}, ckpt)
    with pytest.raises(ValueError, match=r"^top_k=300: above the vocabulary of 256 codes; use at most 256"):
        sample_to_folder(sample_cfg(ckpt, tmp_path / "out", top_k=300))
    with pytest.raises(ValueError, match=r"top_k=257: above the vocabulary of 256"):
        module.generate([1], top_k=257)
    assert module.generate([1], top_k=256).shape == (1, 3, 32, 32)


# ---- files that are not what they are given as --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["notes.txt", "notes.ckpt", "notes.pth", "noise.pth"])
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, name):
    from scalegen.pretrained import load_generator
    path = tmp_path / name
    path.write_text("hello world\n" * 10) if name.startswith("notes") else path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"this file is not a checkpoint \(torch cannot read it"):
        load_generator(str(path))


@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_a_vqvae_given_as_the_generator_says_pass_it_as_vae_ckpt(tmp_path, suffix):
    from conftest import tiny_vq

    from scalegen.official.registry import export
    from scalegen.pretrained import load_generator
    path = tmp_path / f"vae_ch160v4096z32{suffix}"
    torch.save(export("vae", tiny_vq()), path)
    with pytest.raises(ValueError, match=r"is a tokenizer release \(VQVAE\).*as vae_ckpt="):
        load_generator(str(path))
