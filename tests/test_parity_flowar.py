"""Parity with the official FlowAR and MAR KL-VAE code: every golden file in `<parity dir>/flowar` (see its README.md).

A file is recognised by its content: a KL VAE golden (`posterior_moments`) or a FlowAR golden (`forward`, with
`velocity`, and optionally `sample` and `sampler_only`). The official state dict of each file goes through the key
table (scalegen.official), so the converter is tested too. The training loss runs through `GeneratorModule` with
the recorded seed: the same label drop, t and noise draws, in the official order. Sampling replays the recorded
seed through the one generation loop. Every quantity is compared before a test fails; the max |diff| per file and
quantity is printed at the end of the module. The goldens were made with 1 torch thread on CPU in float32.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import LatentsAsImages
from parity import Parity, load_golden

from scalegen.generation.guidance import ScaleGuidance
from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions
from scalegen.heads.flow import euler_sample, euler_times
from scalegen.official import export, load
from scalegen.official.flowar import flowar_config_from_state
from scalegen.official.kl16 import kl_config_from_state
from scalegen.schedule.direct import DirectComposition
from scalegen.training.module import GeneratorModule

ATOL = 1e-4  # floats (issue #3: within 1e-4, expect ~1e-6)

pytestmark = pytest.mark.threads(1)  # the goldens were made with 1 thread (see conftest.py)


# ---- the KL VAE -----------------------------------------------------------------------------------------------------


def check_kl(d: dict, check: Parity) -> None:
    cfg = d["config"]
    # the official class with these constructor values (golden README sec. 5), read back from the keys
    config = kl_config_from_state(d["state_dict"], resolution=cfg["resolution"])
    assert config["enc_attn_resolutions"] == tuple(cfg["enc_attn_resolutions"])
    assert config["dec_attn_resolutions"] == tuple(cfg["dec_attn_resolutions"])
    vae = load("kl16", d["state_dict"], config)
    assert sorted(export("kl16", vae)) == sorted(d["state_dict"])
    post = vae.posterior(d["img"])
    check.close("posterior_moments", post.moments, d["posterior_moments"])
    check.close("posterior_mean", post.mean, d["posterior_mean"])
    check.close("posterior_logvar", post.logvar, d["posterior_logvar"])
    check.close("posterior_std", post.std, d["posterior_std"])
    torch.manual_seed(0)  # the official draw: torch.randn(mean.shape) on the CPU generator
    sample = post.sample()
    check.close("posterior_eps", (sample - post.mean) / post.std, d["posterior_eps"], atol=1e-3)
    check.close("posterior_sample", sample, d["posterior_sample"])
    check.close("recon_from_mean", vae.decode_unscaled(post.mean), d["recon_from_mean"])
    check.close("decoder(golden mean)", vae.decode_unscaled(d["posterior_mean"]), d["recon_from_mean"])
    # the generator's view: encode = mean x scale factor, decode undoes it
    vae.latent = "mean"
    check.close("encode/scale_factor", vae.encode(d["img"]) / vae.scale_factor, d["posterior_mean"])
    check.close("decode(scaled mean)", vae.decode(d["posterior_mean"] * vae.scale_factor, clamp=False), d["recon_from_mean"])


# ---- FlowAR ---------------------------------------------------------------------------------------------------------


def flowar_parts(d: dict, sample_up_size=None):
    gen = load("flowar", d["state_dict"])
    comp = DirectComposition(LatentsAsImages(gen.backbone.token_dim), gen.backbone.scales.sizes, sample_up_size)
    return gen, comp


def check_forward(d: dict, check: Parity) -> None:
    fw, cfg = d["forward"], d["config"]
    gen, comp = flowar_parts(d)
    module = GeneratorModule(comp.tokenizer, gen, comp, ema_decay=None, cond_drop_rate=cfg["label_drop_prob"])
    calls = []
    hook = gen.head.net.register_forward_hook(lambda m, args, out: calls.append((args, out)))
    labels_seen = []
    hook2 = gen.backbone.register_forward_hook(lambda m, args, out: labels_seen.append((args[0], out[0])))
    gen.train()
    torch.manual_seed(d["seeds"]["forward"])
    try:
        loss, per_scale = module._loss((d["latents"], d["label"]), drop_labels=True)
    finally:
        hook.remove(), hook2.remove()
    sched = gen.backbone.scales
    check.exact("labels_effective", labels_seen[0][0], fw["labels_effective"])
    check.close("class_embedding", gen.backbone.class_emb(fw["labels_effective"]), fw["class_embedding"])
    targets = comp.targets(d["latents"])
    check.exact("gt_per_scale", targets, fw["gt_per_scale"])
    inputs = comp.teacher_inputs(targets)
    check.close("x_input_per_scale", [inputs[:, b - 1:e - 1] for b, e in sched.offsets[1:]], fw["x_input_per_scale"])
    hidden = labels_seen[0][1]
    check.close("cond_per_scale", [hidden[:, b:e] for b, e in sched.offsets], fw["cond_per_scale"])
    check.exact("t_per_scale", [args[1].view(-1, 1, 1) for args, _ in calls], fw["t_per_scale"])
    x_t = [(1 - t) * gt + t * n for t, gt, n in zip(fw["t_per_scale"], fw["gt_per_scale"], fw["noise_per_scale"])]
    check.exact("x_t (t, noise draws)", [args[0] for args, _ in calls], x_t)
    check.close("v_pred_per_scale", [out for _, out in calls], fw["v_pred_per_scale"])
    check.close("loss_per_scale", [per_scale[si]["loss"] for si in range(len(sched))],
                [l.mean() for l in fw["loss_per_sample_per_scale"]])
    check.close("loss", loss, fw["loss"])
    check.close("loss (replayed)", loss, d["forward_replay_loss"])

    # the KV-cached generation path on the same teacher-forced inputs gives the same conditions
    gen.eval()
    bb = gen.backbone
    bb.kv_caching(True)
    try:
        x, cond = bb.start(fw["labels_effective"])
        cached = []
        for si, (b, e) in enumerate(sched.offsets):
            cached.append(bb.step(x, cond, si))
            if si + 1 < len(sched):
                nb, ne = sched.offsets[si + 1]
                x = bb.embed_scale(si + 1, inputs[:, nb - 1:ne - 1])
    finally:
        bb.kv_caching(False)
    check.close("cond_per_scale (KV cache)", cached, fw["cond_per_scale"])


def check_velocity(d: dict, check: Parity) -> None:
    v = d["velocity"]
    gen, _ = flowar_parts(d)
    gen.eval()
    hw = gen.backbone.scales.sizes[v["condition_scale_index"]]
    check.exact("t_int", (v["t"] * 1000).long(), v["t_int"])
    check.close("velocity", gen.head.net(v["x_t"], v["t"], v["condition"], hw), v["v"])


def check_sample(d: dict, check: Parity) -> None:
    s = d["sample"]
    # the official sampler's next-input chain goes through a hard-coded 16x16 (flowar.py:422); reproduce it here
    gen, comp = flowar_parts(d, sample_up_size=16)
    gen.eval()
    seen: dict = {}

    def inspect(si, name, t):
        seen.setdefault(name, {}).setdefault(si, []).append(t)

    conds, nexts = [], []
    step = gen.backbone.step
    gen.backbone.step = lambda x, c, *at: conds.append(step(x, c, *at)) or conds[-1]
    advance = comp.advance
    comp.advance = lambda si, st, tok, soft=None: (lambda r: nexts.append(r[1]) or r)(advance(si, st, tok, soft))
    options = GenerateOptions.of(gen.head, cfg_scale=s["cfg"], cfg_schedule="flowar", num_steps=s["num_steps"],
                                 guidance=s["guidance"])
    latent = generate(gen.backbone, gen.head, comp, s["labels"], options,
                      generator=torch.Generator().manual_seed(s["seed"]), inspect=inspect)
    K = len(gen.backbone.scales)
    check.exact("sample/noise_per_scale", [seen["noise"][k][0] for k in range(K)], s["noise_per_scale"])
    check.close("sample/cond_per_scale", conds, s["cond_per_scale"])
    check.close("sample/sampler_out_per_scale", [seen["sampler_out"][k][0] for k in range(K)], s["sampler_out_per_scale_float64"])
    times = [t[0].item() for k in range(K) for t in seen["t"][k]]
    check.exact("sample/flownet_times", torch.tensor(times), torch.tensor(s["flownet_times"]))
    check.close("sample/next_scale_input_per_scale", [n.repeat(2, 1, 1) for n in nexts[:-1]], s["next_scale_input_per_scale"])
    check.close("sample/tokens", latent, s["tokens"])


def check_sampler_only(d: dict, check: Parity) -> None:
    gen, _ = flowar_parts(d)
    gen.eval()
    for case in d["sampler_only"]:
        n = case["noise"].shape[1]
        hw = (math.isqrt(n),) * 2
        times: list = []
        out = euler_sample(lambda x, t: gen.head.net(x, t, case["condition"], hw), case["noise"],
                           euler_times(case["num_steps"]), ScaleGuidance(case["cfg_scale"], "llamagen"), case["guidance_high"],
                           inspect=lambda name, t: times.append(t[0].item()))
        tag = f"sampler_only[N={case['num_steps']}]"
        check.exact(f"{tag} times", torch.tensor(times), torch.tensor(case["flownet_times"]))
        check.close(f"{tag} out_float64", out, case["out_float64"])


def check_flowar(d: dict, check: Parity) -> None:
    config = flowar_config_from_state(d["state_dict"])
    cfg = d["config"]
    assert config["scales"] == tuple((s, s) for s in cfg["scale"]) and config["cross"] == cfg["cross"]
    assert config["token_dim"] == cfg["vae_embed_dim"] and config["flow_width"] == cfg["diffloss_w"]
    exported = export("flowar", load("flowar", d["state_dict"]))
    assert sorted(exported) == sorted(d["state_dict"])
    differ = [k for k in d["state_dict"] if not torch.equal(exported[k], d["state_dict"][k])]
    if differ:
        check.misses.append(f"export round trip: {len(differ)} tensors differ, e.g. {differ[:5]}")
    check_forward(d, check)
    check_velocity(d, check)
    if "sample" in d:
        check_sample(d, check)
    if "sampler_only" in d:
        check_sampler_only(d, check)


@pytest.mark.parity("flowar")
def test_golden(golden_file: Path, max_diffs):
    assert golden_file.is_file(), f"no .pt golden files in {golden_file}"
    d = load_golden(golden_file)
    check = Parity(golden_file.name, max_diffs, atol=ATOL)
    if "posterior_moments" in d:
        with torch.no_grad():
            check_kl(d, check)
    elif "forward" in d and "state_dict" in d:
        check_flowar(d, check)
    else:
        pytest.fail(f"{golden_file.name}: unknown golden format (keys {sorted(d)[:12]})")
    check.finish()
