"""Issue 15: every pairing one override away, and one set of size knobs across the four methods."""
from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from scalegen.build import build_generator, build_tokenizer, check_generator_config
from scalegen.generators.flowar import FlowARTransformer, split_depth

METHODS = ("var", "flexvar", "mvar", "flowar")


# ---- one size knob: backbone.depth / width / num_heads span every method -----------------------------------------


@pytest.mark.parametrize("model", METHODS)
def test_every_backbone_takes_depth_width_num_heads(model):
    cfg = compose_cfg(f"model={model}", "backbone.depth=3", "backbone.width=32", "backbone.num_heads=2")
    check_generator_config(cfg)
    with torch.device("meta"):
        generator, _ = build_generator(cfg, build_tokenizer(cfg), 10)
    assert len(generator.backbone.blocks) == 3 and generator.backbone.width == 32
    assert generator.backbone.blocks[0].attn.num_heads == 2


def test_flowar_split_derived_from_depth_unless_set():
    assert split_depth(12) == (6, 6) and split_depth(16) == (8, 8) and split_depth(30) == (15, 15)
    assert split_depth(3) == (1, 2) and split_depth(5, encoder_depth=1) == (1, 4) and split_depth(5, decoder_depth=1) == (4, 1)
    assert split_depth(None, 8, 8) == (8, 8) and split_depth(None) == (6, 6)
    with pytest.raises(ValueError, match="backbone.depth 4 != backbone.encoder_depth 1"):
        split_depth(4, 1, 1)
    with pytest.raises(ValueError, match="raise depth"):
        split_depth(2, encoder_depth=3)
    bb = FlowARTransformer(10, 4, (1, 2), width=32, depth=3, num_heads=2)
    assert bb.encoder_depth == 1 and bb.depth == 3 and len(bb.blocks) == 3
