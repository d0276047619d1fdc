"""FlowAR on the shared parts: KL VAE, direct composition, FlowAR's transformer, the flow head; presets, official
layouts, the fixes over the official code (cfg=1, train mode, any channel count, bf16), pairings, config errors."""

import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import REPO, LatentsAsImages, compose_cfg, parity_dir

from scalegen.build import build_generator, build_module, build_tokenizer
from scalegen.checks import check_generator_config
from scalegen.errors import ConfigError
from scalegen.generation.guidance import ScaleGuidance
from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions
from scalegen.generators import Generator
from scalegen.generators.flowar import FlowARTransformer
from scalegen.heads.flow import FlowHead, euler_sample, euler_times
from scalegen.heads.flownet import FlowNet, GridVelocity, TimeEmbed
from scalegen.io import CheckpointMismatch
from scalegen.official import export, load, load_pretrained
from scalegen.schedule.direct import DirectComposition, to_map, to_tokens
from scalegen.schedule.scales import area_down, bicubic_up
from scalegen.tokenizers.kl import AutoencoderKL
from scalegen.tokenizers.latent_stats import latent_moments

KEYS, PARITY = parity_dir("keys"), parity_dir("flowar")
pytestmark = [pytest.mark.threads(1),
              pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode", "ignore:.*training_step. returned .None.")]


def tiny_flowar(token_dim=4, scales=(1, 2, 4), cross=False, drop=0.0, num_classes=10):
    backbone = FlowARTransformer(num_classes, token_dim, scales, width=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                                 attn_drop_rate=drop, proj_drop_rate=drop)
    head = FlowHead(32, 32, token_dim=token_dim, flow_width=64, depth=1, cross=cross,
                    num_steps=4)
    return Generator(backbone, head)


def read_keys(name: str) -> dict:
    path = KEYS / name
    if not path.is_file():
        pytest.skip(f"no key list: {path} does not exist (the key lists live in tests/golden/keys)")
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


# ---- presets: exact official parameter counts and key lists ---------------------------------------------------------


@pytest.mark.parametrize("preset, count, keys", [("flowar_s", 171_718_072, "keys_flowar_small.txt"),
                                                 ("flowar_l", 586_862_912, "keys_flowar_large.txt"),
                                                 ("flowar_h", 1_913_316_880, "keys_flowar_huge.txt")])
def test_presets_match_official_counts_and_keys(preset, count, keys):
    cfg = compose_cfg(f"experiment={preset}", "data.root=/nowhere", "tokenizer_ckpt=/nowhere")
    check_generator_config(cfg)
    assert cfg.tokenizer.embed_dim == 16 and cfg.tokenizer.scale_factor == 0.2325 and cfg.model.init is None
    with torch.device("meta"):
        tokenizer = build_tokenizer(cfg)
        generator, composition = build_generator(cfg, tokenizer, 1000)
    assert sum(p.numel() for p in generator.parameters()) == count
    assert sum(p.numel() for p in tokenizer.parameters()) == 66_456_019  # kl16.ckpt
    exported = {k: tuple(v.shape) for k, v in export("flowar", generator).items()}
    assert exported == read_keys(keys)  # incl. the `mask` and `*.rope.freqs` buffers of the release
    assert {k: tuple(v.shape) for k, v in export("kl16", tokenizer).items()} == read_keys("keys_kl16.txt")
    assert isinstance(composition, DirectComposition) and composition.scales.final == (16, 16)


# ---- the direct composition ----------------------------------------------------------------------------------------


def test_direct_composition_chain_uses_the_latent_size():
    torch.manual_seed(0)
    latent = torch.randn(2, 3, 8, 8)
    comp = DirectComposition(LatentsAsImages(3), [1, 2, 4, 8])
    targets = comp.targets(latent)
    assert [t.shape for t in targets] == [(2, n * n, 3) for n in (1, 2, 4, 8)]
    assert torch.equal(targets[-1], to_tokens(latent)) and torch.equal(targets[1], to_tokens(area_down(latent, (2, 2))))
    inputs = comp.teacher_inputs(targets)
    want = torch.cat([to_tokens(area_down(bicubic_up(to_map(targets[k], (s, s)), (8, 8)), (2 * s, 2 * s)))
                      for k, s in enumerate((1, 2, 4))], dim=1)
    assert torch.equal(inputs, want)
    # generation feeds the same chain (the official sampler's hard-coded 16x16 is opt-in, and differs here)
    nxt = [comp.advance(k, None, targets[k])[1] for k in range(3)]
    assert torch.equal(torch.cat(nxt, dim=1), inputs)
    official = DirectComposition(LatentsAsImages(3), [1, 2, 4, 8], sample_up_size=16)
    assert not torch.allclose(official.advance(1, None, targets[1])[1], nxt[1])
    state, last = comp.advance(3, None, targets[3])
    assert last is None and torch.equal(state, latent)


# ---- the transformer and the head ----------------------------------------------------------------------------------


@torch.no_grad()
def test_kv_cache_equals_block_causal_forward_on_non_square_scales():
    torch.manual_seed(0)
    gen = tiny_flowar(scales=[(1, 1), (1, 2), (2, 4)]).eval()
    bb, sched = gen.backbone, gen.backbone.scales
    labels, inputs = torch.tensor([1, 10]), torch.randn(2, sched.num_tokens - 1, 4)
    full, _ = bb(labels, inputs)
    bb.kv_caching(True)
    x, cond = bb.start(labels)
    steps = []
    for si, (b, e) in enumerate(sched.offsets):
        steps.append(bb.step(x, cond, si))
        if si + 1 < len(sched):
            nb, ne = sched.offsets[si + 1]
            x = bb.embed_scale(si + 1, inputs[:, nb - 1:ne - 1])
    bb.kv_caching(False)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    # block-causal: a later scale's input does not change earlier outputs
    inputs2 = inputs.clone()
    inputs2[:, -8:] += 1
    changed = bb(labels, inputs2)[0]
    assert torch.allclose(changed[:, :3], full[:, :3], atol=1e-6) and not torch.allclose(changed, full, atol=1e-3)


def test_time_grids_and_time_truncation():
    g25 = euler_times(25)
    assert len(g25) == 25 and g25.dtype == torch.float64  # 24 Euler steps
    assert g25[11].item() == pytest.approx(0.3) and g25[12].item() == 0.25 and g25[-1] == 0
    assert torch.equal(euler_times(50), torch.linspace(1, 0, 51, dtype=torch.float64))
    assert torch.equal(euler_times(24), g25) and len(euler_times(4)) == 5
    assert torch.equal(euler_times(1), torch.tensor([1.0, 0.0], dtype=torch.float64))  # one step, not none
    with pytest.raises(ValueError, match="num_steps"):
        euler_times(0)
    emb = TimeEmbed(8)
    t = torch.tensor([0.0004, 0.0, 0.1234, 0.1239])
    out = emb(t)
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3])  # (t*1000).long(): 0.4 -> 0, 123.9 -> 123
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emb(t).dtype == torch.float32  # kept out of mixed precision


def test_sampling_with_cfg_1_in_train_mode_any_channels():
    torch.manual_seed(0)
    gen = tiny_flowar(token_dim=3, cross=True, drop=0.1).train()  # dropout on: the official sampler crashes here
    comp = DirectComposition(LatentsAsImages(3), gen.backbone.scales.sizes)
    labels = torch.tensor([2, 5])
    out = generate(gen.backbone, gen.head, comp, labels,
                   GenerateOptions.of(gen.head, cfg_scale=1.0, cfg_schedule="flowar", num_steps=3),
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()  # 3 channels: no hard-coded 16
    # cfg = 1 uses no guidance: the conditional half does not depend on the null-class rows
    net = gen.eval().head.net
    noise, z = torch.randn(4, 4, 3), torch.randn(4, 4, 32)
    z2 = torch.cat([z[:2], torch.randn(2, 4, 32)])
    run = lambda cond, cfg: euler_sample(lambda x, t: net(x, t, cond, (2, 2)), noise, euler_times(4), ScaleGuidance(cfg, "llamagen"), 0.9)
    assert torch.equal(run(z, 1.0)[:2], run(z2, 1.0)[:2]) and not torch.equal(run(z, 2.0)[:2], run(z2, 2.0)[:2])


@pytest.mark.parametrize("cross", [False, True])
def test_grid_velocity_equals_the_flow_network_step_by_step(cross):
    """The sampler's velocity, with the AdaLN modulations of several grid times computed at once (chunks of 1, 3
    and all steps), gives the network's own velocity at every step to float rounding (the products have other row
    counts); a time off the grid is computed directly."""
    torch.manual_seed(0)
    net = FlowNet(3, 32, 16, 2, cross=cross, num_heads=2).eval()
    z, hw = torch.randn(4, 4, 16), (2, 2)
    times = euler_times(7)[:-1].float()
    with torch.no_grad():
        context = net.context(z, hw)
        for rows in (1, 3 * 16, 1024):
            velocity = GridVelocity(net, context, times, rows=rows)
            for t in times:
                x = torch.randn(4, 4, 3)
                assert torch.allclose(velocity(x, t.expand(4)), net(x, t.expand(4), z, hw), atol=1e-5, rtol=0)
            off = torch.full((4,), 0.123)
            assert torch.equal(velocity(x, off), net(x, off, z, hw))


def test_loss_weights_follow_token_counts():
    torch.manual_seed(0)
    gen = tiny_flowar()
    sched = gen.backbone.scales
    hidden = torch.randn(3, sched.num_tokens, 32)
    targets = [torch.randn(3, n, 4) for n in sched.token_counts]
    loss, per_scale = gen.head.training_loss(hidden, None, targets, sched)
    assert torch.allclose(loss, sum(per_scale[k]["loss"] * n / 16 for k, n in enumerate(sched.token_counts)))
    loss.backward()
    assert all(p.grad is not None for p in gen.head.parameters())


# ---- the KL VAE: official layout, scale factor -------------------------------------------------------------------


def tiny_kl(embed_dim=4, **kw):
    return AutoencoderKL(embed_dim=embed_dim, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16,
                         enc_attn_resolutions=(8,), **kw)


@torch.no_grad()
def test_kl_scale_factor_in_one_place_and_measured():
    torch.manual_seed(0)
    vae = tiny_kl(latent="mean", scale_factor=0.5).eval()
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    post = vae.posterior(img)
    assert torch.equal(vae.encode(img), post.mean * 0.5)
    assert torch.allclose(vae.decode(vae.encode(img), clamp=False), vae.decode_unscaled(post.mean), atol=1e-6)
    vae.latent = "sample"
    stats = latent_moments(vae, [(img, None)])
    draws = torch.stack([vae.posterior(img).sample() for _ in range(400)])
    assert stats["std"] == pytest.approx(draws.std().item(), rel=0.02)  # exact moments of the posterior samples
    assert stats["scale_factor"] == pytest.approx(1 / stats["std"])
    with pytest.raises(RuntimeError, match="scale_factor is null"):
        tiny_kl(scale_factor=None).encode(img)


def test_official_kl_layout_loads_and_mismatch_lists_keys(tmp_path):
    vae = tiny_kl()
    path = tmp_path / "kl.ckpt"
    torch.save({"model": export("kl16", vae)}, path)  # MAR's layout: the state dict under "model"
    cfg = compose_cfg("model=flowar", "tokenizer.ch_mult=[1,2]", "tokenizer.resolution=16",
                      "tokenizer.enc_attn_resolutions=[8]", "tokenizer.scale_factor=1.0")
    loaded = build_tokenizer(cfg, str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    with pytest.raises(CheckpointMismatch, match=r"shape mismatch.*post_quant_conv"):
        build_tokenizer(compose_cfg("model=flowar", "tokenizer.ch_mult=[1,2]", "tokenizer.resolution=16",
                                    "tokenizer.enc_attn_resolutions=[8]", "tokenizer.embed_dim=8"), str(path))


# ---- official FlowAR releases: key table, sample.py path, converter -------------------------------------------------


def test_official_release_loads_for_sampling_and_converts(tmp_path):
    golden = PARITY / "flowar_cross.pt"
    if not golden.is_file():
        pytest.skip(f"no golden files: {golden} does not exist")
    state = torch.load(golden, weights_only=True)["state_dict"]  # the official flat layout (mask, rope.freqs)
    torch.save(state, tmp_path / "FlowAR.pth")
    torch.manual_seed(0)
    kl16 = AutoencoderKL(embed_dim=16, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)  # f=16, like kl16
    torch.save({"model": export("kl16", kl16)}, tmp_path / "kl16.ckpt")
    from scalegen.pretrained import load_generator
    module = load_generator(str(tmp_path / "FlowAR.pth"), str(tmp_path / "kl16.ckpt"))
    assert module.sample_cfg["cfg_schedule"] == "flowar" and module.sample_cfg["num_steps"] == 25
    images = module.generate([3, 7], num_steps=2, cfg_scale=1.5)
    assert images.shape == (2, 3, 256, 256) and torch.isfinite(images).all()

    # a tokenizer with another channel count is refused, naming the key
    torch.save({"model": export("kl16", AutoencoderKL(embed_dim=4, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1))},
               tmp_path / "kl4.ckpt")
    with pytest.raises(ValueError, match=r"vae_ckpt: .* 4 channels.* reads 16"):
        load_pretrained(str(tmp_path / "FlowAR.pth"), str(tmp_path / "kl4.ckpt"))

    # the converter: official -> safetensors -> official gives the same tensors; the safetensors samples too
    from scalegen.official.convert import main as convert
    convert(["flowar", str(tmp_path / "FlowAR.pth"), "-o", str(tmp_path / "f.safetensors")])
    convert(["flowar", str(tmp_path / "f.safetensors"), "-o", str(tmp_path / "back.pth"), "--to-official"])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    convert(["kl16", str(tmp_path / "kl16.ckpt"), "-o", str(tmp_path / "kl.safetensors")])
    parts = load_pretrained(str(tmp_path / "f.safetensors"), str(tmp_path / "kl.safetensors"))
    assert parts is not None and parts[0].latent_channels == 16

    bad = dict(state)
    bad["mask"] = torch.zeros_like(state["mask"])  # a release of another schedule is refused, not silently loaded
    with pytest.raises(ValueError, match="buffer 'mask'"):
        load("flowar", bad)


# ---- config errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    (["+head.token_dim=8"], r"^head\.token_dim: .*derived"),
    (["scales=[1,2,4]"], r"^scales: the last scale \(4, 4\) must equal the latent size 8x8"),
    (["head.num_steps=0"], r"^head\.num_steps=0: needs an integer >= 1"),
    (["+sample.num_steps=0"], r"^sample\.num_steps=0"),
    (["head=categorical"], r"CategoricalHead.*continuous"),
    (["composition=residual"], r"model\.composition=residual"),
    (["tokenizer=msvq_digits", "head=categorical"], r"^model\.composition=direct gives continuous latents"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_generator_config(compose_cfg("model=flowar", *overrides))


# ---- pairings by config override: 2 training steps each -------------------------------------------------------------


def two_steps(cfg, precision="32"):
    from scalegen.data import DigitsDataModule
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=8)
    module = build_module(cfg, data.num_classes)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    losses = []
    module.log = lambda name, value, *a, **k: losses.append(float(value.detach())) if name == "train/loss" else None
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and len(losses) == 2 and all(math.isfinite(l) for l in losses)
    assert module.nonfinite_total == 0
    return module


@pytest.mark.parametrize("overrides", [
    ["tokenizer.scale_factor=1.0"],  # FlowAR as published: KL VAE + flow head
    ["tokenizer=msvq_digits"],  # the flow head on the VQ tokenizer's continuous (pre-quantization) latent
    ["tokenizer=msvq_digits", "head=categorical", "composition=residual"],  # FlowAR's transformer, VQ codes
    ["tokenizer.scale_factor=1.0", "backbone=adaln", "head=flow_cross"],  # VAR's transformer + FlowAR-L's head
], ids=["kl-flow", "vq-latent-flow", "vq-codes-categorical", "adaln-flow_cross"])
def test_pairings_train_two_steps(overrides):
    cfg = compose_cfg("model=flowar", *overrides)
    check_generator_config(cfg)
    module = two_steps(cfg)
    images = module.generate([1, 2], num_steps=2) if "head=categorical" not in overrides else module.generate([1, 2])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_bf16_mixed_trains_finite():
    two_steps(compose_cfg("model=flowar", "tokenizer.scale_factor=1.0"), precision="bf16-mixed")


def test_nonfinite_loss_is_skipped_and_reported(capsys):
    from scalegen.data import DigitsDataModule
    cfg = compose_cfg("model=flowar", "tokenizer.scale_factor=1.0")
    module = build_module(cfg, 10)
    real = module.generator.head.training_loss
    calls = []

    def poisoned(*args):
        loss, logs = real(*args)
        calls.append(1)
        return (loss * float("nan"), logs) if len(calls) == 1 else (loss, logs)

    module.generator.head.training_loss = poisoned
    before = [p.detach().clone() for p in module.generator.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    assert module.nonfinite_total == 1 and "non-finite loss (nan) at step 0" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(before, module.generator.parameters()))  # never applied


# ---- the method config end to end: python train.py model=flowar (tokenizer first), then sample.py -----------------


@pytest.mark.slow
def test_train_py_model_flowar_two_steps_then_sample(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "model=flowar", "trainer.max_steps=2",
                           "tokenizer_training.max_steps=2", "trainer.val_check_interval=2", "sample.per_class=1",
                           "data.batch_size=8", f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tokenizer.scale_factor=" in proc.stdout  # measured on the training data, not guessed
    text = (run_dir / "config.yaml").read_text()  # the run's config carries the measured factor
    assert "scale_factor: null" not in text and (run_dir / "samples" / "final.png").is_file()
    from scalegen.pretrained import load_generator
    module = load_generator(str(run_dir / "checkpoints" / "last.ckpt"))
    assert module.tokenizer.scale_factor > 0
    images = module.generate([0, 9], num_steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_latent_stats_command_prints_the_scale_factor(capsys):
    from scalegen.tokenizers.latent_stats import main
    main(["model=flowar", "data.batch_size=16", "max_batches=2"])
    out = capsys.readouterr().out
    std = float(out.split("std ")[1].split()[0])
    factor = float(out.split("tokenizer.scale_factor=")[1].split()[0])
    assert std > 0 and factor == pytest.approx(1 / std, rel=1e-4)
