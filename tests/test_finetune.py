"""Fine-tuning (`init_from=`): a tiny model trained on the digits (10 classes) is fine-tuned on a two-class image
folder, resizing its class embedding; the tokenizer is fine-tuned the same way; resizing keeps shared rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from omegaconf import open_dict
from PIL import Image

from scalegen.commands.train import train
from scalegen.errors import ConfigError
from scalegen.io import read_checkpoint
from scalegen.training.init_from import generator_state, resize_classes

pytestmark = pytest.mark.threads(1)
TINY = ["backbone.depth=1", "backbone.width=32", "backbone.num_heads=2", "trainer.val_check_interval=2",
        "+trainer.limit_val_batches=1", "sample.per_class=1", "callbacks.progress=null", "tokenizer_training.max_steps=1"]


def run(out, *overrides):
    cfg = compose_cfg(*TINY, f"logger.csv.save_dir={out}", f"callbacks.checkpoint.dirpath={out}/checkpoints", *overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A tiny scalegen checkpoint: 1 tokenizer step and 1 generator step on the 10 digit classes."""
    return run(tmp_path_factory.mktemp("digits") / "run", "trainer.max_steps=1", "data.batch_size=8")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """<root>/train/{cat,dog}/*.png: 4 small images per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            pixels = (rng.random((40, 40, 3)) * 127 + 128 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    return root


FOLDER = ["data=imagefolder", "data.image_size=32", "data.num_workers=0", "data.batch_size=4", "data.val_fraction=0.25"]


def test_finetune_on_an_image_folder_resizes_the_class_embedding(digits_ckpt, image_folder, tmp_path, capsys):
    ckpt = run(tmp_path / "ft", *FOLDER, f"data.root={image_folder}", f"init_from={digits_ckpt}", "trainer.max_steps=2")
    said = capsys.readouterr().out
    assert "has 10 classes, the data 2: the class embedding is resized" in said
    assert f"generator starts from the EMA weights of scalegen checkpoint {digits_ckpt}" in said
    assert not (tmp_path / "ft" / "tokenizer.safetensors").exists()  # the checkpoint's tokenizer, none trained
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert state["state_dict"]["generator.backbone.class_emb.weight"].shape == (3, 32)
    source = torch.load(digits_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for key in ("tokenizer.quant_conv.weight", "tokenizer.decoder.conv_out.weight"):
        assert torch.equal(state["state_dict"][key], source[key])


def test_resize_keeps_shared_rows_new_rows_from_init_and_null_last(digits_ckpt):
    from conftest import tiny_module
    target = tiny_module(num_classes=12).generator
    fresh = target.state_dict()["backbone.class_emb.weight"].clone()
    state, _ = generator_state(str(digits_ckpt))
    old = state["backbone.class_emb.weight"]
    new = resize_classes(state, target, "src")["backbone.class_emb.weight"]
    assert new.shape == (13, 32)
    assert torch.equal(new[:10], old[:10]) and torch.equal(new[10:12], fresh[10:12]) and torch.equal(new[-1], old[-1])
    shrunk = resize_classes(state, tiny_module(num_classes=2).generator, "src")["backbone.class_emb.weight"]
    assert torch.equal(shrunk[:2], old[:2]) and torch.equal(shrunk[-1], old[-1])


def test_finetune_the_tokenizer(digits_ckpt, image_folder, tmp_path, capsys):
    out = tmp_path / "tok"
    run(out, "task=tokenizer", *FOLDER, f"data.root={image_folder}", f"init_from={digits_ckpt}")
    assert f"tokenizer starts from {digits_ckpt}" in capsys.readouterr().out
    trained = read_checkpoint(str(out / "tokenizer.safetensors"))
    source = torch.load(digits_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert trained.keys() == {k.removeprefix("tokenizer.") for k in source if k.startswith("tokenizer.")}


def test_init_from_a_missing_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        run(tmp_path / "x", f"init_from={tmp_path / 'nope.ckpt'}", "trainer.max_steps=1", "data.batch_size=8")
