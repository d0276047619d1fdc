"""FlexVAR on the shared parts: FlexVAE, scale-free positions, any-step / any-size sampling with the official rules,
random training schedules, the presets, the official key tables and loaders, and the config-time refusals."""

import importlib
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_cfg
from torch.utils.data import DataLoader, TensorDataset

from scalegen.build import build_generator, build_tokenizer
from scalegen.checks import check_generator_config
from scalegen.errors import ConfigError
from scalegen.generation.guidance import guide
from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions
from scalegen.generators.flexvar import ScaleFreeTransformer, sincos_table
from scalegen.io import CheckpointMismatch
from scalegen.official import export, load
from scalegen.official.flexvar import OFFICIAL_SIDES, build_flexvar
from scalegen.pretrained import load_generator
from scalegen.schedule.anyscale import RandomScales
from scalegen.schedule.direct_vq import DirectVQComposition
from scalegen.schedule.residual import ResidualComposition
from scalegen.schedule.scales import VAR_256, ScaleSchedule, area_down
from scalegen.tokenizers.flexvq import FlexVAE
from scalegen.tokenizers.train import TokenizerModule
from scalegen.training.module import GeneratorModule

convert_cli = importlib.import_module("scalegen.official.convert")
OFFICIAL_PARAMS = {16: 315_561_936, 20: 607_513_952, 24: 1_041_314_576}
FLEXVAE_PARAMS = 72_049_827

pytestmark = [pytest.mark.threads(1), pytest.mark.filterwarnings("ignore:.*does not have many workers.*")]


def tiny_vae(seed: int = 0) -> FlexVAE:
    """16 px images -> 8x8 latent of 8 channels, 32 codes."""
    torch.manual_seed(seed)
    return FlexVAE(vocab_size=32, codebook_dim=8, z_channels=16, ch=16, ch_mult=(1, 1), num_res_blocks=1,
                   norm_groups=8, usage_window=64).eval()


def tiny_gen(scales=(1, 2, 4, 8), seed: int = 1):
    torch.manual_seed(seed)
    gen = build_flexvar(dict(num_classes=4, token_dim=8, scales=scales, depth=2, width=32, num_heads=2, pos_grid=8,
                             vocab_size=32))
    with torch.no_grad():  # not the ~identity init: logits that differ between classes and positions
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return gen.eval()


def randomized(state: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    fixed = ("zero_k_bias", "attn_bias_for_masking", "codebook_used")  # buffers the release holds as they are
    return {k: v if k.endswith(fixed) else torch.randn(v.shape, generator=g) for k, v in state.items()}


# ---- presets, released sizes and keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", sorted(OFFICIAL_PARAMS))
def test_presets_match_official_parameter_counts(depth):
    cfg = compose_cfg(f"experiment=flexvar_d{depth}", "data.root=/x")
    check_generator_config(cfg)
    with torch.device("meta"):
        tok = build_tokenizer(cfg)
        gen, comp = build_generator(cfg, tok, 1000)
    assert sum(p.numel() for p in gen.parameters()) == OFFICIAL_PARAMS[depth]
    assert sum(p.numel() for p in tok.parameters()) == FLEXVAE_PARAMS
    assert isinstance(gen.backbone, ScaleFreeTransformer) and not hasattr(gen.backbone, "lvl_embed")
    assert gen.backbone.pos_embed.shape == (1, 64 * depth, 32, 32)
    assert comp.vocab_size == 8912 and comp.token_dim == 32 and comp.scales.sizes[-1] == (16, 16)


def read_keys(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def test_official_key_tables_match_the_release_key_lists(parity_root):
    vae_keys = read_keys(parity_root / "keys" / "keys_flexvae.txt")
    var_keys = read_keys(parity_root / "keys" / "keys_flexvar_d16.txt")
    with torch.device("meta"):
        vae = FlexVAE()
        gen = build_flexvar(dict(num_classes=1000, token_dim=32, scales=VAR_256, depth=16, vocab_size=8912))
    for state, keys, name in ((export("flexvae", vae), vae_keys, "FlexVAE"), (export("flexvar", gen), var_keys, "FlexVAR-d16")):
        assert {k: tuple(v.shape) for k, v in state.items()} == keys, name


# ---- FlexVAE ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_flexvae_scales_are_quantised_on_their_own_and_decode_alone():
    vae = tiny_vae()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    latent = vae.encode(img)
    idx = vae.quantize_scales(latent, (1, 2, 3, 8))
    for (i, size) in zip(idx, [(1, 1), (2, 2), (3, 3), (8, 8)]):
        # no residual: each scale is the nearest normalised code of the pooled, normalised latent
        z = F.normalize(area_down(latent, size).permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
        expected = (z @ F.normalize(vae.quantize.embedding.weight, dim=-1).T).argmax(-1)
        assert torch.equal(i.flatten(), expected)
        assert vae.decode_code(i, size).shape == (2, 3, 2 * size[0], 2 * size[1])  # any single scale decodes
    assert torch.equal(vae.quantize_scales(latent, (3, 8))[0], idx[2])  # a scale's tokens ignore the other scales


def test_flexvae_trains_on_random_scales_through_the_tokenizer_module(tmp_path):
    vae = tiny_vae()
    vae.train_scales = 2
    vae.train()
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    sizes = [tuple(r.shape[-2:] for r in vae(img)[0]) for _ in range(6)]
    assert all(len(s) == 3 and s[-1] == (16, 16) and s[0][0] < s[1][0] < 16 for s in sizes)
    assert len(set(sizes)) > 1  # a new draw every step
    vae.eval()
    assert vae(img)[0].shape == (4, 3, 16, 16)  # eval: the finest reconstruction only

    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(32, 3, 8, 8, generator=g) * 2 - 1, size=16, mode="bilinear")
    data = DataLoader(TensorDataset(images, torch.zeros(32, dtype=torch.long)), batch_size=8)
    module = TokenizerModule(vae, lr=3e-3)

    @torch.no_grad()
    def mse():
        vae.eval()
        return sum(F.mse_loss(vae(x)[0], x).item() for x, _ in data) / len(data)

    before = mse()
    fit = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    fit.fit(module, data)
    assert mse() < 0.7 * before
    assert vae.quantize.codebook_used.unique().numel() > 1  # the official usage window was filled in training
    # codebook use is logged per scale each step quantised (by its token-map size), besides the official window
    usage = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("train/usage")}
    assert {"train/usage", "train/usage_8x8"} <= set(usage) and "train/usage_s0" not in usage, sorted(usage)
    assert all(0 < v <= 100 for v in usage.values())


# ---- positions, schedules and generation -------------------------------------------------------------------------------


def test_position_table_is_flexvars_and_resized_by_area():
    table = sincos_table(4, 6)
    y, x, k = 2, 3, 1
    w = 10000 ** (-2 * k / 6)
    assert torch.allclose(table[0, 2 * k, y, x], torch.tensor(y * w).sin()) and torch.allclose(
        table[0, 2 * k + 1, y, x], torch.tensor(x * w).cos())
    gen = tiny_gen()
    bb = gen.backbone
    sched = ScaleSchedule.of((1, 3, 16))  # 16 > the 8x8 grid: area upsampling
    pos = bb.level_pos(sched)
    assert pos.shape == (1, 1 + 9 + 256, 32)
    torch.testing.assert_close(pos[:, 1:10], area_down(bb.pos_embed, (3, 3)).flatten(2).transpose(1, 2))
    assert bb.attention_bias(sched).shape == (266, 266)


@torch.no_grad()
@pytest.mark.parametrize("scales", [(1, 2, 4, 8), (1, 3, 5, 7, 9, 12)], ids=["trained", "other"])
def test_generation_replays_through_teacher_forcing_on_any_schedule(scales):
    vae, gen = tiny_vae(), tiny_gen()
    comp = DirectVQComposition(vae, (1, 2, 4, 8))
    labels = torch.tensor([0, 3])
    seen = {"idx": [], "logits_cfg": []}
    codes = generate(gen.backbone, gen.head, comp, labels, GenerateOptions.of(gen.head, cfg_scale=0.0, scales=scales),
                     generator=torch.Generator().manual_seed(0),
                     inspect=lambda si, n, t: seen[n].append(t.clone()) if n in seen else None)
    assert len(seen["idx"]) == len(scales)  # as many steps as the list has scales: no 9-vs-10 confusion
    assert gen.backbone.scales.sizes[-1] == comp.scales.sizes[-1] == (8, 8)  # restored after the call
    assert codes.shape == (2, 8, scales[-1], scales[-1])
    assert vae.decode(codes).shape == (2, 3, 2 * scales[-1], 2 * scales[-1])  # any final size
    comp = comp.at(scales)
    logits = gen.head(*gen.backbone(labels, comp.teacher_inputs(seen["idx"]), comp.scales))
    for si, (b, e) in enumerate(comp.scales.offsets):
        torch.testing.assert_close(seen["logits_cfg"][si], logits[:, b:e], atol=1e-4, rtol=0)


@torch.no_grad()
def test_mamba_backbone_with_flexvar_positions_runs_any_schedule():
    """M-VAR's blocks (generators/mvar.py) on the same positions: any list, state cache = full forward."""
    cfg = compose_cfg("model=flexvar", "backbone=mvar_flex", "backbone.depth=1", "backbone.headdim=32")
    torch.manual_seed(0)
    tok = build_tokenizer(cfg).eval()
    gen, comp = build_generator(cfg, tok, 10)
    gen.eval()
    labels, scales = torch.tensor([2, 7]), (1, 2, 3, 5, 8, 10)
    seen = {"idx": [], "logits_cfg": []}
    codes = generate(gen.backbone, gen.head, comp, labels, GenerateOptions.of(gen.head, cfg_scale=0.0, scales=scales),
                     generator=torch.Generator().manual_seed(0),
                     inspect=lambda si, n, t: seen[n].append(t.clone()) if n in seen else None)
    assert tok.decode(codes).shape == (2, 3, 40, 40) and gen.backbone.scales.final == (8, 8)
    comp = comp.at(scales)
    logits = gen.head(*gen.backbone(labels, comp.teacher_inputs(seen["idx"]), comp.scales))
    for si, (b, e) in enumerate(comp.scales.offsets):
        torch.testing.assert_close(seen["logits_cfg"][si], logits[:, b:e], atol=1e-4, rtol=0)


@torch.no_grad()
def test_official_cfg_ramp_max_side_and_greedy_off_grid():
    vae, gen = tiny_vae(), tiny_gen()
    comp = DirectVQComposition(vae, (1, 2, 4, 8))
    labels, cfg = torch.tensor([1, 2]), 2.0
    scales = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)  # 13 steps: the ramp goes past cfg after step 9
    seen = {"idx": [], "logits_cfg": []}
    generate(gen.backbone, gen.head, comp, labels,
             GenerateOptions.of(gen.head, cfg_scale=cfg, scales=scales, ratio_steps=9, max_side=10, top_k=3,
                                trained_sides=OFFICIAL_SIDES), generator=torch.Generator().manual_seed(0),
             inspect=lambda si, n, t: seen[n].append(t.clone()) if n in seen else None)
    comp = comp.at(scales)
    inputs = comp.teacher_inputs(seen["idx"])
    c = gen.head(*gen.backbone(labels, inputs, comp.scales))
    u = gen.head(*gen.backbone(torch.full_like(labels, 4), inputs, comp.scales))
    for si, (b, e) in enumerate(comp.scales.offsets):
        side = scales[si]
        t = cfg if side > 10 else cfg * si / 9  # max_side: constant past it; else si / min(S-1, 9)
        torch.testing.assert_close(seen["logits_cfg"][si], guide(c[:, b:e], u[:, b:e], t), atol=1e-4, rtol=1e-5)
        greedy = side > 10 or side not in OFFICIAL_SIDES  # 7, 9, 11, 12: top_k=1
        if greedy:
            assert torch.equal(seen["idx"][si], seen["logits_cfg"][si].argmax(-1))
    assert cfg * 10 / 9 > cfg  # step 10 (side 11) would exceed cfg without max_side


def test_llamagen_guidance_mix():
    c, u = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(guide(c, u, 4.0, "llamagen"), u + (c - u) * 4.0)
    torch.testing.assert_close(guide(c, u, 4.0, "llamagen"), guide(c, u, 3.0))
    with pytest.raises(ValueError, match="cfg_mix"):
        guide(c, u, 1.0, "other")


def test_random_schedules_follow_the_official_statistics():
    draw = RandomScales(seed=0)  # the official numbers (trainer.py gen_curr_patch_nums)
    lists = [draw() for _ in range(4000)]
    tokens = [sum(s * s for s in x) for x in lists]
    share = lambda cond: sum(map(cond, lists)) / len(lists)
    assert max(tokens) <= 680 and 560 < sum(tokens) / len(tokens) < 620  # official: mean 591
    assert all(x[0] == 1 and x == sorted(set(x)) for x in lists)  # the budget may drop any of the last four, 2 too
    assert share(lambda x: x[:2] == [1, 2]) > 0.99
    assert abs(share(lambda x: len(x) == 9) - 0.48) < 0.04 and abs(share(lambda x: len(x) == 8) - 0.39) < 0.04
    assert abs(share(lambda x: x[-1] == 16) - 0.666) < 0.04  # the budget may drop the final scale
    assert abs(share(lambda x: x == list(VAR_256)) - 0.046) < 0.015
    assert abs(share(lambda x: len(x) == 7) - 0.066) < 0.02 and abs(share(lambda x: len(x) == 10) - 0.05) < 0.02
    assert abs(share(lambda x: x[-1] == 15) - 0.137) < 0.03  # FLEXVAR.md's Monte-Carlo run of the official function
    a, b = RandomScales(seed=7), RandomScales(seed=7)  # the same generator state gives the same lists
    assert [a() for _ in range(20)] == [b() for _ in range(20)]
    small = RandomScales(default=(1, 2, 3, 4, 6, 8), pools=((3, 6, 2), (6, 8, 1)))
    for _ in range(300):
        x = small()
        assert x[0] == 1 and sum(s * s for s in x) <= 130 and x[-1] <= 8


def test_training_steps_draw_a_schedule_and_restore_it():
    vae, gen = tiny_vae(), tiny_gen()
    comp = DirectVQComposition(vae, (1, 2, 4, 8))
    drawn = []

    def schedule():
        drawn.append([1, 2, 3, 5, 8] if len(drawn) % 2 else [1, 2, 6])
        return drawn[-1]

    module = GeneratorModule(vae, gen, comp, ema_decay=None, batch_size=4, train_scales=schedule)
    counts = []
    head_loss = gen.head.training_loss
    gen.head.training_loss = lambda h, c, t, s: counts.append(len(s)) or head_loss(h, c, t, s)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    trainer.fit(module, DataLoader(TensorDataset(images, torch.randint(0, 4, (8,))), batch_size=4))
    assert counts == [3, 5] and gen.backbone.scales.sizes[-1] == (8, 8) and comp.scales.sizes[-1] == (8, 8)


# ---- config-time refusals and the official bugs ----------------------------------------------------------------------


def test_schedule_changes_refused_for_residual_var_at_config_time():
    with pytest.raises(ConfigError, match=r"sample.scales.*ResidualComposition: residual"):
        check_generator_config(compose_cfg("model=var", "+sample.scales=[1,2,4,8]"))
    check_generator_config(compose_cfg("model=var", "+sample.scales=[1,2,3,4,6,8]"))  # its own list is fine
    with pytest.raises(ConfigError, match=r"model.train_scales.*AdaLNTransformer"):
        check_generator_config(compose_cfg("model=flexvar", "backbone=adaln"))
    with pytest.raises(ConfigError, match=r"model.composition=direct_vq.*MultiScaleVQVAE"):
        check_generator_config(compose_cfg("model=flexvar", "tokenizer=msvq_digits"))
    check_generator_config(compose_cfg("model=flexvar", "+sample.scales=[1,2,3,4,5,6,7,8,10,12]"))
    check_generator_config(compose_cfg("model=flexvar", "backbone=mvar_flex"))  # Mamba blocks, the same positions

    from scalegen.official.var import build_var
    from scalegen.tokenizers import MultiScaleVQVAE
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=16, ch_mult=(1, 1), num_res_blocks=1, v_patch_nums=(1, 2, 4),
                          using_sa=False, using_mid_sa=False, norm_groups=8)
    gen = build_var(dict(num_classes=3, token_dim=4, scales=(1, 2, 4), depth=1, width=32, num_heads=2, shared_aln=False,
                         attn_l2_norm=True, vocab_size=16))
    module = GeneratorModule(vae, gen, ResidualComposition(vae), ema_decay=None)
    with pytest.raises(ConfigError, match="scales=.*quantizer's schedule"):
        module.generate([0], scales=[1, 2, 3, 4])


def test_int_label_and_step_count():
    vae, gen = tiny_vae(), tiny_gen()
    module = GeneratorModule(vae, gen, DirectVQComposition(vae, (1, 2, 4, 8)), ema_decay=None)
    images = module.generate(3, batch=2, seed=5)  # the official int label_B path crashes (lvl_1L)
    assert images.shape == (2, 3, 16, 16) and torch.equal(images, module.generate([3, 3], seed=5))
    assert module.generate(-1, batch=1).shape == (1, 3, 16, 16)  # < 0: the null class
    calls = []
    hook = gen.head.register_forward_hook(lambda *a: calls.append(1))
    module.generate([0], scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))  # README's "default 10 steps": 10 here
    hook.remove()
    assert len(calls) == 10


# ---- official files: converter, loader ------------------------------------------------------------------------------


def release_files(tmp_path: Path, wrap: bool) -> tuple[Path, Path, dict, dict]:
    """Official-layout FlexVAE (under 'model') and FlexVAR (bare or under trainer.var_wo_ddp) files, random weights."""
    torch.manual_seed(0)  # the official GroupNorm has 32 groups: width 32
    vae_state = randomized(export("flexvae", FlexVAE(vocab_size=32, codebook_dim=8, z_channels=16, ch=32, ch_mult=(1, 1),
                                                  num_res_blocks=1)), 1)
    vae_state["quantize.codebook_used"] = torch.zeros(64)
    var_state = randomized(export("flexvar", tiny_gen(scales=VAR_256)), 2)
    var_state["attn_bias_for_masking"] = torch.zeros(1, 1, 632, 632)  # another schedule, xformers-padded: rebuilt
    torch.save({"model": vae_state}, tmp_path / "FlexVAE.pth")
    torch.save({"trainer": {"var_wo_ddp": var_state}} if wrap else var_state, tmp_path / "FlexVARd2.pth")
    return tmp_path / "FlexVAR2.pth", tmp_path / "FlexVAE.pth", var_state, vae_state


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "trainer-wrapped"])
def test_release_files_load_convert_and_sample(wrap, tmp_path):
    _, vae_path, var_state, vae_state = release_files(tmp_path, wrap)
    var_path = tmp_path / "FlexVARd2.pth"
    with pytest.raises(ValueError, match="FlexVAE.pth"):
        load_generator(str(var_path))
    module = load_generator(str(var_path), str(vae_path))
    assert module.sample_cfg["ratio_steps"] == 9 and module.sample_cfg["max_side"] == 16
    images = module.generate([0, 2], seed=0, top_k=4)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert module.generate([1], seed=0, top_k=4, scales=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16]).shape == (1, 3, 32, 32)

    # converter: official -> safetensors -> official; the masking buffer comes back for the model's own schedule
    convert_cli.main(["flexvar", str(var_path), "-o", str(tmp_path / "var.safetensors")])
    convert_cli.main(["flexvae", str(vae_path), "-o", str(tmp_path / "vae.safetensors")])
    again = load_generator(str(tmp_path / "var.safetensors"), str(tmp_path / "vae.safetensors"))
    assert torch.equal(again.generate([0, 2], seed=0, top_k=4), images)
    convert_cli.main(["flexvar", str(tmp_path / "var.safetensors"), "-o", str(tmp_path / "back.pth"), "--to-official"])
    convert_cli.main(["flexvae", str(tmp_path / "vae.safetensors"), "-o", str(tmp_path / "vae_back.pth"), "--to-official"])
    back, vae_back = (torch.load(tmp_path / n, weights_only=True) for n in ("back.pth", "vae_back.pth"))
    assert back["attn_bias_for_masking"].shape == (1, 1, 680, 680)
    assert all(torch.equal(back[k], v) for k, v in var_state.items() if k != "attn_bias_for_masking")
    assert set(vae_back) == set(vae_state) and all(torch.equal(vae_back[k], v) for k, v in vae_state.items())


def test_release_that_does_not_fit_lists_the_keys(tmp_path):
    state = export("flexvar", tiny_gen(scales=VAR_256))
    del state["head_nm.ada_lin.1.weight"]
    state["blocks.0.attn.nonsense"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match=r"missing \(1\): head\.norm\.ada_lin\.1\.weight"):
        load("flexvar", state)
    vae_state = export("flexvae", tiny_vae())
    vae_state.pop("decoder.conv_out.bias")
    with pytest.raises(CheckpointMismatch, match="decoder.conv_out.bias"):
        load("flexvae", vae_state, norm_groups=8)


# ---- the method on the built-in digits, end to end (tokenizer, generator, sample.py with any steps) -------------------


@pytest.mark.slow
def test_model_flexvar_trains_and_samples_any_steps(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(*args):
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    run("train.py", "model=flexvar", "trainer.max_steps=2", "tokenizer_training.max_steps=2", "trainer.val_check_interval=2",
        "sample.per_class=1", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (tmp_path / "run" / "samples" / "final.png").is_file()
    run("sample.py", f"ckpt={ckpt}", "labels=[1,7]", "scales=[1,2,3,4,5,6,7,8,10,12]", f"hydra.run.dir={tmp_path / 's'}")
    from PIL import Image
    assert Image.open(tmp_path / "s" / "images" / "000000_class1.png").size == (48, 48)  # 12 tokens x 4 px
