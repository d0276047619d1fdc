"""Image-to-image on the built-in digits: refinement, in-painting, out-painting / expansion, for any scale-wise model.

The models are randomly initialised (the mechanics do not need a trained one): at every scale the tokens of the
known region must be the input image's, the others sampled; sample.py runs the same through its `edit` group.
"""

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from PIL import Image

from scalegen.build import build_generator, build_tokenizer, run_config
from scalegen.checks import check_generator_config
from scalegen.data import DigitsDataModule
from scalegen.generation.editing import KnownTokens, expand_canvas, known_tokens, stretched, token_masks
from scalegen.training.module import GeneratorModule

pytestmark = pytest.mark.threads(1)


def module_for(model: str, seed: int = 0):
    # FlowAR's KL tokenizer wants its latent scale measured on data; any value does for the mechanics
    cfg = compose_cfg(f"model={model}", *(["tokenizer.scale_factor=1.0"] if model == "flowar" else []))
    check_generator_config(cfg)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg)
    generator, composition = build_generator(cfg, tokenizer, 10)
    module = GeneratorModule(tokenizer, generator, composition, ema_decay=cfg.model.ema_decay, config=run_config(cfg))
    return module.eval(), cfg


@pytest.fixture(scope="module")
def digits():
    """Two digits of the built-in set, (2, 3, 32, 32) in [-1, 1], and their labels."""
    data = DigitsDataModule(image_size=32, batch_size=2, val_fraction=0.1)
    data.setup("fit")
    images, labels = next(iter(data.val_dataloader()))
    return images[:2], labels[:2].tolist()


@pytest.fixture(scope="module")
def flexvar():
    return module_for("flexvar")[0]


class Recorder(KnownTokens):
    """The hook, keeping what it hands on (the merged targets) for the checks."""

    def __init__(self, hook: KnownTokens):
        super().__init__(hook.targets, hook.known)
        self.merged = []

    def __call__(self, si, sampled, soft):
        merged, soft = super().__call__(si, sampled, soft)
        self.merged.append(merged.clone())
        return merged, soft


def run(module, image, labels, mask=None, scales=None, keep_scales=0, seed=0, **opts):
    hook = Recorder(known_tokens(module, image, mask, scales=scales, keep_scales=keep_scales))
    images = module.generate(labels, seed=seed, scales=scales, constrain=hook, **opts)
    return images, hook


def test_token_masks_cover_whole_tokens():
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 16:] = 0  # the right half is to be generated
    m = token_masks(mask, [1, 2, 4, 8])
    assert m[0].tolist() == [[False]]  # the single coarse token straddles the hole
    assert m[1].view(2, 2).tolist() == [[True, False], [True, False]]
    assert m[3].view(8, 8)[:, :4].all() and not m[3].view(8, 8)[:, 4:].any()
    assert token_masks(mask, [1, 2], threshold=0.5)[0].tolist() == [[True]]
    assert not any(k.any() for k in token_masks(None, [1, 2, 4]))  # no mask: nothing known but the kept scales
    assert [k.all().item() for k in token_masks(None, [1, 2, 4], keep_scales=1)] == [True, False, False]
    assert [k.all().item() for k in token_masks(mask, [1, 2, 4], keep_scales=2)] == [True, True, False]


@torch.no_grad()
def test_refinement_keeps_the_coarse_scales_of_the_input(flexvar, digits):
    images, labels = digits
    out, hook = run(flexvar, images, labels, keep_scales=3)
    assert out.shape == (2, 3, 32, 32)
    for si, merged in enumerate(hook.merged):
        same = torch.equal(merged, hook.targets[si])
        assert same if si < 3 else not same  # fine scales are sampled (a random model does not copy the input)


@torch.no_grad()
def test_inpainting_samples_only_the_hole(flexvar, digits):
    images, labels = digits
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 0
    _, hook = run(flexvar, images, labels, mask=mask.expand(2, -1, -1, -1))
    for merged, target, known in zip(hook.merged, hook.targets, hook.known):
        assert torch.equal(merged[known], target[known])
    final, known = hook.merged[-1], hook.known[-1]
    assert (~known).sum() == 2 * 16 and (final[~known] != hook.targets[-1][~known]).any()
    # everything known: the output is the tokenizer's own reconstruction of the input's finest tokens
    out, hook = run(flexvar, images, labels, mask=torch.ones(2, 1, 32, 32))
    recon = flexvar.tokenizer.decode_code(hook.targets[-1], (8, 8)).add(1).mul(0.5)
    torch.testing.assert_close(out, recon, atol=1e-6, rtol=0)


@torch.no_grad()
def test_expansion_generates_a_larger_canvas_around_the_input(flexvar, digits):
    images, labels = digits
    canvas, mask = expand_canvas(images, (8, 8, 0, 16))  # top, bottom, left, right px
    assert canvas.shape == (2, 3, 48, 48) and mask[..., 8:40, :32].all() and not mask[..., :8, :].any()
    scales = stretched(flexvar.composition.scales, (12, 12))
    assert scales[0] == (1, 1) and scales[-1] == (12, 12) and len(scales) == len(flexvar.composition.scales)
    out, hook = run(flexvar, canvas, labels, mask=mask, scales=scales)
    assert out.shape == (2, 3, 48, 48)
    known = hook.known[-1].view(2, 12, 12)
    assert known[:, 2:10, :8].all() and not known[:, :2].any() and not known[:, :, 8:].any()
    assert torch.equal(hook.merged[-1][hook.known[-1]], hook.targets[-1][hook.known[-1]])
    assert flexvar.composition.scales.final == (8, 8)  # the model's schedule is back


@torch.no_grad()
@pytest.mark.parametrize("model", ["var", "flowar"])
def test_inpainting_works_for_other_methods(model, digits):
    """Residual (VAR) and continuous (FlowAR) targets take the same hook, on their own schedules."""
    module, _ = module_for(model)
    images, labels = digits
    mask = torch.ones(2, 1, 32, 32)
    mask[..., 16:] = 0
    out, hook = run(module, images, labels, mask=mask, **({"num_steps": 2} if model == "flowar" else {}))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    for merged, target, known in zip(hook.merged, hook.targets, hook.known):
        assert torch.equal(merged[known], target[known].to(merged.dtype))
    assert not hook.known[-1].all() and hook.known[-1].any()


def test_sample_py_edit_group(digits, tmp_path):
    """sample.py's `edit` options: in-painting with a mask file, and expansion with the model's list stretched."""
    from omegaconf import OmegaConf

    from scalegen.commands.sample import sample_to_folder
    module, cfg = module_for("flexvar")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"scalegen_config": run_config(cfg), "state_dict": module.state_dict()}, ckpt)
    img = ((digits[0][0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(img).save(tmp_path / "digit.png")
    mask = np.full((32, 32), 255, np.uint8)
    mask[:, 16:] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for name, edit_opts in (("inpaint", [f"edit.mask={tmp_path / 'mask.png'}"]), ("expand", ["edit.expand=[8,8,0,16]"])):
        out = tmp_path / name
        sample_cfg = compose_cfg(f"ckpt={ckpt}", "labels=[3,5]", f"out_dir={out}", "batch_size=2",
                                 f"edit.image={tmp_path / 'digit.png'}", *edit_opts, config="sample")
        OmegaConf.set_struct(sample_cfg, False)
        sample_to_folder(sample_cfg)
        with np.load(out / "samples.npz") as data:
            assert data["arr_0"].shape == ((2, 32, 32, 3) if name == "inpaint" else (2, 48, 48, 3))
    # the same call for a residual model, with another list: refused before anything is drawn
    var, var_cfg = module_for("var")
    torch.save({"scalegen_config": run_config(var_cfg), "state_dict": var.state_dict()}, tmp_path / "var.ckpt")
    from scalegen.errors import ConfigError
    with pytest.raises(ConfigError, match="scales"):
        sample_to_folder(compose_cfg(f"ckpt={tmp_path / 'var.ckpt'}", "labels=[1]", "scales=[1,2,4,8]",
                                     f"out_dir={tmp_path / 'var_out'}", config="sample"))
    assert not (tmp_path / "var_out" / "images").exists() or not any((tmp_path / "var_out" / "images").iterdir())
