"""Issue 15: every pairing one override away, and one set of size knobs across the four methods."""
from __future__ import annotations

import mix_matrix as mix
import pytest
import torch
from conftest import REPO, compose_cfg
from omegaconf import OmegaConf

from scalegen.build import build_generator, build_module, build_tokenizer
from scalegen.checks import check_generator_config
from scalegen.commands.train import metrics_line
from scalegen.errors import ConfigError
from scalegen.generation.editing import stretched
from scalegen.generators.flowar import FlowARTransformer, split_depth
from scalegen.heads.flow import FlowHead
from scalegen.pretrained import load_generator
from scalegen.schedule.anyscale import check_scales

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


# ---- a head swap takes the new head's sampling defaults ---------------------------------------------------------

TINY = ("backbone.depth=1", "backbone.width=32", "backbone.num_heads=2")
MAMBA = ("backbone.headdim=32", "backbone.d_state=16")


def train_and_sample(module, steps: int = 2):
    images, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 3, 5, 9])
    opt = torch.optim.AdamW([p for p in module.generator.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in module.generator.parameters()]
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = module._loss((images, labels), drop_labels=True)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, module.generator.parameters()))
    out = module.generate([1, 2], seed=0)
    assert out.shape == (2, 3, 32, 32) and out.isfinite().all()
    return out


@pytest.mark.parametrize("model, extra", [("var", ()), ("mvar", MAMBA)])
def test_flow_head_on_a_categorical_method_samples(model, extra):
    """`model=var|mvar head=flow composition=direct`: the model's `sample:` block holds no categorical option, so
    the flow head gets its own (num_steps, guidance) and the method's guidance schedule (VAR's linear ramp)."""


    torch.manual_seed(0)
    cfg = compose_cfg(f"model={model}", "head=flow", "composition=direct", "head.flow_width=32", "head.depth=1",
                      "head.num_steps=2", *TINY, *extra)
    module = build_module(cfg, 10)
    assert isinstance(module.generator.head, FlowHead)
    assert module.sampling_options().guidance.cfg_schedule == "linear"
    train_and_sample(module)


def test_categorical_sampling_defaults_are_the_heads():

    module = build_module(compose_cfg("head.top_k=5", "head.top_p=0.5", *TINY), 10)
    head = module.generator.head
    assert (head.top_k, head.top_p, head.more_smooth) == (5, 0.5, False)
    assert module.sampling_options().head.top_k is None  # None: the head's own
    assert module.sampling_options(top_k=3).head.top_k == 3
    with pytest.raises(ConfigError, match=r"^head\.top_k=5000: above the vocabulary of \d+ codes"):
        check_generator_config(compose_cfg("head.top_k=5000"))
    with pytest.raises(ConfigError, match=r"^head\.top_k=-1: needs an integer >= 0"):
        check_generator_config(compose_cfg("head.top_k=-1"))


# ---- companion settings named; statistics of another schedule reset, not refused -------------------------------


def test_a_pairing_that_needs_a_companion_setting_names_it():
    with pytest.raises(ConfigError, match=r"model\.train_scales=null") as e:
        check_generator_config(compose_cfg("model=flexvar", "head=flow", "composition=direct"))
    assert "backbone=flexvar or mvar_flex with composition=direct_vq" in str(e.value)
    check_generator_config(compose_cfg("model=flexvar", "head=flow", "composition=direct", "model.train_scales=null"))


def test_a_companion_fix_names_what_it_needs_in_turn():
    """FlexVAR's method on VAR's residual tokenizer: composition=residual alone would then refuse the random
    training schedule, so the message names model.train_scales=null with it."""
    with pytest.raises(ConfigError, match=r"composition=residual model\.train_scales=null"):
        check_generator_config(compose_cfg("model=flexvar", "tokenizer=msvq_digits"))
    check_generator_config(compose_cfg("model=flexvar", "tokenizer=msvq_digits", "composition=residual",
                                       "model.train_scales=null", "backbone=adaln"))


def test_a_trained_vq_tokenizer_loads_under_another_scale_list(tmp_path):
    """VAR's tokenizer trained on [1, 2, 3, 4, 6, 8] under FlowAR's doubling scales: its per-scale usage statistics
    (6 rows, 4 wanted) are reset with a note; every weight loads."""
    var_cfg = compose_cfg("model=var")
    trained = build_tokenizer(var_cfg)
    trained.quantize.usage_ema.fill_(1.0)
    ckpt = tmp_path / "tok.ckpt"
    torch.save({"state_dict": {f"tokenizer.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    with pytest.warns(UserWarning, match=r"quantize\.usage_ema holds statistics of shape \(6, 256\).*\(4, 256\): reset"):
        tok = build_tokenizer(compose_cfg("model=flowar", "tokenizer=msvq_digits"), str(ckpt))
    assert tok.quantize.usage_ema.shape == (4, 256) and tok.quantize.usage_ema.abs().sum() == 0
    assert torch.equal(tok.quantize.embedding.weight, trained.quantize.embedding.weight)
    assert torch.equal(tok.decoder.conv_in.weight, trained.decoder.conv_in.weight)


# ---- sweep folders: path-valued overrides stay out of the job names ---------------------------------------------


def test_path_valued_overrides_stay_out_of_job_names():
    cfg = compose_cfg("tokenizer_ckpt=/data/tok.ckpt", "init_from=/data/run/last.ckpt", "data=imagefolder", "data.root=/data/imagenet",
                      "backbone.depth=2", "model=flexvar", hydra_config=True)
    assert cfg.hydra.job.override_dirname == "backbone.depth=2,data=imagefolder,model=flexvar"
    cfg = compose_cfg("ckpt=/data/run/last.ckpt", "vae_ckpt=/data/vae.pth", "cfg_scale=2.0", config="sample",
                      hydra_config=True)
    assert cfg.hydra.job.override_dirname == "cfg_scale=2.0"


# ---- the matrix: every meaningful cell builds, trains and samples; every other is refused naming a fix ----------


def test_matrix_counts():
    assert len(mix.cells()) == 90 and sum(map(mix.meaningful, mix.cells())) == 25


@pytest.mark.parametrize("cell", [c for c in mix.cells() if not mix.meaningful(c)], ids="-".join)
def test_refused_cell_names_the_override_that_makes_it_work(cell):
    with pytest.raises(ConfigError) as e:
        check_generator_config(compose_cfg(*mix.overrides(cell)))
    msg = str(e.value)
    assert any(all(o in msg for o in fix) for fix in mix.fixes(cell)), (msg, mix.fixes(cell))


@pytest.mark.parametrize("backbone", list(mix.BACKBONES))
def test_meaningful_cells_train_two_steps_and_sample(backbone):
    """Each meaningful (tokenizer, composition, head) with this backbone: built from the configs (random-init
    tokenizers, 1-block parts), two training steps in-process, then generation."""
    for cell in [c for c in mix.cells() if c[1] == backbone and mix.meaningful(c)]:
        torch.manual_seed(0)
        cfg = compose_cfg(*mix.overrides(cell))
        if cfg.tokenizer.get("scale_factor", 1.0) is None:  # a KL tokenizer's factor is measured by train.py
            cfg.tokenizer.scale_factor = 1.0
        train_and_sample(build_module(cfg, 10))


def test_readme_mixes_table_is_the_matrix():
    text = (REPO / "README.md").read_text()
    table = text[text.index("<!-- mixes -->"):text.index("<!-- /mixes -->")]
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in table.splitlines()[3:] if line]
    assert {(kind, comp, head) for kind, _, comp, head in rows} == mix.MEANINGFUL
    for kind, toks, _, _ in rows:
        assert mix.TOKENIZERS[kind] in toks


# ---- 15.7: a short run's final line does not point to a metrics file it did not write ---------------------------


def test_final_metrics_line_says_why_a_short_run_has_none(tmp_path):
    trainer = OmegaConf.create({"log_every_n_steps": 10, "max_steps": 2})
    line = metrics_line(tmp_path, trainer)
    assert "no metrics.csv" in line and "trainer.log_every_n_steps=10" in line
    (tmp_path / "metrics.csv").write_text("step\n")
    assert metrics_line(tmp_path, trainer) == f"metrics: {tmp_path / 'metrics.csv'}"


# ---- 15.8: the README says which edits each method supports, and the code agrees --------------------------------


def test_readme_edit_table_matches_what_each_method_runs():
    text = (REPO / "README.md").read_text()
    table = text[text.index("<!-- edits -->"):text.index("<!-- /edits -->")]
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[3:] if line)}
    assert set(rows) == {"VAR", "M-VAR", "FlexVAR", "FlowAR"}
    extra = {"mvar": MAMBA}
    for method, model in (("VAR", "var"), ("M-VAR", "mvar"), ("FlexVAR", "flexvar"), ("FlowAR", "flowar")):
        module = build_module(compose_cfg(f"model={model}", *TINY, *extra.get(model, ())), 10)
        parts = (module.generator.backbone, module.composition)
        assert check_scales(module.composition.scales, *parts) is None  # painting, refinement: the own list
        assert rows[method][0] == rows[method][1] == "yes"
        canvas = stretched(module.composition.scales, (8, 10))  # 8 px more on one side
        if rows[method][2] == "yes":
            assert check_scales(canvas, *parts) is not None
        else:
            assert rows[method][2].startswith("no")
            with pytest.raises(ConfigError, match="runs only on the scales it was built with"):
                check_scales(canvas, *parts)


# ---- 15.2: a release's default top-k above a small file's vocabulary is clamped, with a note ---------------------


def test_release_default_top_k_above_the_vocabulary_is_clamped(tmp_path):
    from test_flexvar import release_files  # official-layout FlexVAR/FlexVAE files, 32 codes

    release_files(tmp_path, False)
    with pytest.warns(UserWarning, match=r"default top_k=900 is above this model's vocabulary of 32 codes: sampling "
                                         r"with top_k=32"):
        module = load_generator(str(tmp_path / "FlexVARd2.pth"), str(tmp_path / "FlexVAE.pth"))
    assert module.generate([0], seed=0).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"^top_k=33: above the vocabulary of 32 codes"):
        module.generate([0], top_k=33)
