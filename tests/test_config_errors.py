"""Wrong configs fail at config time, naming the key; wrong checkpoints fail listing the keys."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_cfg
from omegaconf import OmegaConf

from scalegen.checks import check_generator_config
from scalegen.errors import ConfigError
from scalegen.io import CheckpointMismatch, load_strict


class ContinuousTok(torch.nn.Module):
    """A stand-in for a continuous (KL) tokenizer: no codebook, no residual quantizer."""

    discrete = False
    residual = False

    def __init__(self, z_channels: int = 16):
        super().__init__()


def test_default_config_checks():
    check_generator_config(compose_cfg())


def test_unknown_key_named_with_allowed_keys():
    cfg = compose_cfg("+backbone.foo=1")
    with pytest.raises(ConfigError) as err:
        check_generator_config(cfg)
    msg = str(err.value)
    assert msg.startswith("backbone.foo:")
    assert "allowed" in msg and "depth" in msg and "shared_aln" in msg
    assert "num_classes" not in msg  # derived keys are not offered


@pytest.mark.parametrize("override, key", [("+backbone.num_classes=3", "backbone.num_classes"),
                                           ("+backbone.token_dim=8", "backbone.token_dim"),
                                           ("+head.vocab_size=5", "head.vocab_size")])
def test_derived_key_named(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: .*derived"):
        check_generator_config(compose_cfg(override))


def test_unknown_head_key_named():
    with pytest.raises(ConfigError, match=r"^head\.temperature: unknown key for CategoricalHead"):
        check_generator_config(compose_cfg("+head.temperature=2"))


def test_scales_not_ending_at_latent_size():
    # digits: 32 px through a 4x-downsampling tokenizer is an 8x8 latent
    with pytest.raises(ConfigError, match=r"^scales: .*\(4, 4\).*8x8"):
        check_generator_config(compose_cfg("scales=[1,2,4]"))
    check_generator_config(compose_cfg("scales=[1,2,4,8]"))


def test_scales_differing_from_tokenizer_schedule():
    with pytest.raises(ConfigError, match=r"v_patch_nums"):
        check_generator_config(compose_cfg("tokenizer.v_patch_nums=[1,2,3,8]"))


def test_unknown_composition():
    with pytest.raises(ConfigError, match=r"^model\.composition: 'foo'"):
        check_generator_config(compose_cfg("model.composition=foo"))


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml")))
def test_every_model_config_checks(name):
    check_generator_config(compose_cfg(f"model={name}"))


@pytest.mark.parametrize("override, match", [
    ("+model.composition.foo=1", r"^model\.composition\.foo: unknown key for ResidualComposition"),
    ("+model.composition.scales=[1]", r"^model\.composition\.scales: .*derived"),
    ("model.composition._partial_=false", r"^model\.composition\._partial_: must be true"),
    ("+model.optimizer.lr=1", r"^model\.optimizer\.lr: .*derived.*base_lr"),
    ("+model.optimizer.momentum=0.9", r"^model\.optimizer\.momentum: unknown key for AdamW"),
    ("model.optimizer._partial_=false", r"^model\.optimizer\._partial_: must be true"),
    ("model.lr_schedule.kind=foo", r"^model\.lr_schedule\.kind: 'foo'"),
    ("+model.lr_schedule.warmup_steps=5", r"^model\.lr_schedule\.warmup_steps: unknown key for LRSchedule"),
])
def test_composition_and_optimizer_nodes_named(override, match):
    with pytest.raises(ConfigError, match=match):
        check_generator_config(compose_cfg(override))


def test_optimizer_and_schedule_built_from_their_nodes():
    from scalegen.build import build_module
    from scalegen.schedule.direct_vq import DirectVQComposition

    cfg = compose_cfg("model=flexvar", "data.batch_size=8", "backbone.depth=1", "backbone.width=32",
                      "backbone.num_heads=2", "model.lr_schedule.base_lr=2e-4", "model.optimizer.weight_decay=0.1",
                      "+model.optimizer.eps=1e-6")
    module = build_module(cfg, 10)
    assert isinstance(module.composition, DirectVQComposition)
    assert module.peak_lr == 2e-4 * 8 / 256
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == module.peak_lr for g in opt.param_groups)


def test_unimportable_target_named():
    with pytest.raises(ConfigError, match=r"^tokenizer\._target_: cannot import"):
        check_generator_config(compose_cfg("tokenizer._target_=scalegen.tokenizers.NoSuchTokenizer"))


def test_categorical_head_needs_a_discrete_tokenizer():
    cfg = compose_cfg()
    cfg.tokenizer = OmegaConf.create({"_target_": f"{__name__}.ContinuousTok", "z_channels": 16})
    with pytest.raises(ConfigError, match=r"CategoricalHead.*ContinuousTok is continuous"):
        check_generator_config(cfg)


def test_train_py_unknown_override_fails_fast(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for override in ("backbone.nosuchkey=1", "+backbone.nosuchkey=1"):  # rejected by Hydra, then by scalegen
        proc = subprocess.run([sys.executable, "train.py", override, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0, override
        assert "backbone.nosuchkey" in proc.stderr, proc.stderr
        # before any compute: no tokenizer stage began (its folder is its first write), nothing was saved
        assert not (run_dir / "tokenizer").exists() and not (run_dir / "checkpoints").exists()
        assert not (run_dir / "tokenizer.safetensors").exists()
        assert not list(tmp_path.rglob("*.ckpt"))


def test_load_strict_lists_missing_and_unexpected():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = module.state_dict()
    state.pop("1.bias")
    state["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as err:
        load_strict(module, state, "my checkpoint")
    msg = str(err.value)
    assert "my checkpoint" in msg
    assert "missing (1): 1.bias" in msg and "unexpected (1): 2.weight" in msg


def test_load_strict_lists_shape_mismatch_and_loads_when_fine():
    module = torch.nn.Linear(3, 4)
    bad = {"weight": torch.zeros(4, 5), "bias": torch.zeros(4)}
    with pytest.raises(CheckpointMismatch, match=r"weight: checkpoint \(4, 5\) vs model \(4, 3\)"):
        load_strict(module, bad)
    good = {"weight": torch.ones(4, 3), "bias": torch.full((4,), 2.0)}
    load_strict(module, good)
    assert torch.equal(module.weight, good["weight"]) and torch.equal(module.bias, good["bias"])
