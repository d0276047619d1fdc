"""Parity with the official VAR code: every golden file in `<parity dir>/var` (see its README.md).

A file is recognised by its content, not its name: a VQVAE golden (`config.ddconfig` + `img`), a quantizer golden
(`variants`) or a VAR golden (`label_B` + `samples`, paired with the VQVAE file named in `vae_file`). Optional keys
(`dec_out_unclamped`, ...) are checked when present. Every quantity of a file is compared before the test fails,
and the failure lists each one that differs and by how much. The largest |ours - golden| per file and quantity is
printed at the end of the module. The goldens were made with 2 torch threads on CPU in float32.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity import Parity, load_golden

from scalegen.generation.loop import generate, random_labels
from scalegen.generation.options import GenerateOptions
from scalegen.official import export, load
from scalegen.official.table import convert
from scalegen.official.var import VAE_TABLE, vae_config_from_state, var_config_from_state
from scalegen.schedule.residual import ResidualComposition
from scalegen.tokenizers import MultiScaleQuantizer, phi_table

# absolute tolerances (README "Suggested tolerances"); indices are compared exactly, losses relatively
LATENT, LOGITS, IMAGE, LOSS_RTOL = 1e-5, 1e-4, 1e-4, 1e-5

pytestmark = pytest.mark.threads(2)  # the goldens were made with 2 threads (see conftest.py)


def golden_kind(obj) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "variants" in obj:
        return "quantizer"
    if "label_B" in obj and "samples" in obj:
        return "var"
    if "img" in obj and isinstance(obj.get("config"), dict) and "ddconfig" in obj["config"]:
        return "vqvae"
    return None


@pytest.mark.parity("var")
def test_golden(golden_file: Path, max_diffs):
    assert golden_file.is_file(), f"no .pt golden files in {golden_file}"
    obj = load_golden(golden_file)
    kind = golden_kind(obj)
    assert kind, (f"{golden_file.name}: unknown golden format (top-level keys {sorted(obj)[:12] if isinstance(obj, dict) else type(obj)}); "
                  "expected a VQVAE (config.ddconfig + img), quantizer (variants) or VAR (label_B + samples) golden")
    check = Parity(golden_file.name, max_diffs)
    with torch.no_grad():
        {"vqvae": check_vqvae, "quantizer": check_quantizer, "var": check_var}[kind](obj, golden_file, check)
    check.finish()


# ---- VQVAE golden --------------------------------------------------------------------------------------------------


def build_vae(golden: dict):
    """load("vae", ...) infers the sizes from the keys; what the keys cannot say comes from the file's config."""
    cfg = golden["config"]
    return load("vae", golden["state_dict"], v_patch_nums=cfg["v_patch_nums"], beta=cfg["beta"], using_znorm=cfg["using_znorm"],
                    quant_resi=cfg["quant_resi"], default_qresi_counts=cfg["default_qresi_counts"])


def _norm(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_vae_config(golden: dict, check: Parity) -> None:
    file_cfg = {**golden["config"], **golden["config"]["ddconfig"]}
    inferred = vae_config_from_state(golden["state_dict"])
    for key in sorted(set(inferred) & set(file_cfg)):
        check.equal(f"inferred config {key}", _norm(inferred[key]), _norm(file_cfg[key]))


def check_vqvae(g: dict, path: Path, check: Parity) -> None:
    check_vae_config(g, check)
    vae = build_vae(g)
    q, sizes = vae.quantize, vae.scales.sizes
    img, f, idx = g["img"], g["f"], g["idx_Bl"]

    check.close("enc_out", vae.encoder(img), g["enc_out"], LATENT)
    check.close("f", vae.encode(img), f, LATENT)
    ours_idx = vae.img_to_idx(img)
    check.exact("idx_Bl", ours_idx, idx)
    check.exact("gt_BL", torch.cat(ours_idx, 1), g["gt_BL"])
    check.close("x_BLCv_wo_first_l", q.teacher_inputs(idx), g["x_BLCv_wo_first_l"], LATENT)
    fhat_list = q.quantize(f, to_fhat=True)
    check.close("fhat_list", fhat_list, g["fhat_list"], LATENT)
    check.close("fhat", fhat_list[-1], g["fhat"], LATENT)
    check.close("recon", vae.idx_to_img(idx), g["recon"], IMAGE)
    # README: recon_list_mean[si, b] = mean of image b decoded from f_hat after scale si (clamped)
    fhat_from_embed = q.embed_to_fhat([q.embed(i, s) for i, s in zip(idx, sizes)])
    means = torch.stack([vae.decode(fh).mean(dim=(1, 2, 3)) for fh in fhat_from_embed])
    check.close("recon_list_mean", means, g["recon_list_mean"], IMAGE)
    check.relative("vq_loss", vae(img)[1], g["train_forward"]["vq_loss"], LOSS_RTOL)
    if "dec_out_unclamped" in g:
        check.close("dec_out_unclamped", vae.decode(g["fhat"], clamp=False), g["dec_out_unclamped"], IMAGE)

    exported = export("vae", vae)
    check.equal("export_vae keys", set(exported), set(g["state_dict"]))
    check.same_tensors("export_vae tensors vs the file", exported, g["state_dict"])
    check.same_tensors("export_vae -> load_vae round trip", build_vae({**g, "state_dict": exported}).state_dict(), vae.state_dict())


# ---- quantizer golden (10 scales, several phi-sharing variants) ----------------------------------------------------


def build_quantizer(variant: dict) -> MultiScaleQuantizer:
    cfg = variant["config"]
    q = MultiScaleQuantizer(cfg["vocab_size"], channels=cfg["Cvae"], scales=cfg["v_patch_nums"], beta=cfg["beta"],
                            using_znorm=cfg["using_znorm"], quant_resi=cfg["quant_resi"],
                            share_quant_resi=cfg["share_quant_resi"], default_qresi_counts=cfg["default_qresi_counts"])
    # the variant's keys are the VQVAE's without the `quantize.` prefix: rename them through the VQVAE table
    ours, _ = convert({f"quantize.{k}": v for k, v in variant["state_dict"].items()}, VAE_TABLE)
    q.load_state_dict({k.removeprefix("quantize."): v for k, v in ours.items()}, strict=True)
    return q.eval()


def check_quantizer(g: dict, path: Path, check: Parity) -> None:
    f = g["f"]
    for name, v in g["variants"].items():
        q, at = build_quantizer(v), f"{name}: "
        sizes = q.scales.sizes
        idx = v["idx_Bl"]
        check.equal(f"{at}phi table", list(phi_table(len(q.phi), len(sizes))), list(v["phi_index_per_scale"]))
        check.exact("idx_Bl", q.quantize(f), idx, at)
        check.close("fhat_list", q.quantize(f, to_fhat=True), v["fhat_list"], LATENT, at)
        check.close("x_BLCv_wo_first_l", q.teacher_inputs(idx), v["x_BLCv_wo_first_l"], LATENT, at)
        codes = [q.embed(i, s) for i, s in zip(idx, sizes)]
        check.close("fhat_from_idx", q.embed_to_fhat(codes), v["fhat_from_idx"], LATENT, at)
        check.close("fhat_progressive", q.embed_to_fhat(codes, all_to_max_scale=False), v["fhat_progressive"], LATENT, at)

        f_hat, next_maps = f.new_zeros(f.shape), []
        for si, s in enumerate(sizes):
            f_hat, nxt = q.next_input(si, f_hat, q.embed(idx[si], s))
            if (nxt is None) != (si == len(sizes) - 1):
                check.misses.append(f"{at}next_input at scale {si}: next map is {nxt!r:.20}, expected one only before the last scale")
            if nxt is not None:
                next_maps.append(nxt.clone())
        check.close("ar_next_maps", next_maps, v["ar_next_maps"], LATENT, at)
        check.close("ar_f_hat", f_hat, v["ar_f_hat"], LATENT, at)

        fwd_f_hat, loss, _ = q(f)
        check.close("forward_f_hat", fwd_f_hat, v["forward_f_hat"], LATENT, at)
        check.relative("forward_vq_loss", loss, v["forward_vq_loss"], LOSS_RTOL, at)


# ---- VAR golden (paired with a VQVAE golden) -----------------------------------------------------------------------


def check_var_config(g: dict, check: Parity) -> None:
    cfg = g["config"]
    inferred = var_config_from_state(g["state_dict"], scales=cfg["patch_nums"])
    pairs = dict(depth="depth", width="embed_dim", num_heads="num_heads", shared_aln="shared_aln",
                 attn_l2_norm="attn_l2_norm", num_classes="num_classes")
    for ours, theirs in pairs.items():
        check.equal(f"inferred config {ours}", inferred[ours], cfg[theirs])
    check.equal("inferred config scales", [tuple(s) for s in inferred["scales"]], [(p, p) for p in cfg["patch_nums"]])


def check_var(g: dict, path: Path, check: Parity) -> None:
    vae_path = path.parent / g["vae_file"]
    assert vae_path.is_file(), f"{path.name} is paired with {g['vae_file']}, which is not in {path.parent}"
    vae_golden = load_golden(vae_path)
    made_with, found = g.get("vae_state_dict_sha256"), vae_golden.get("state_dict_sha256")
    if made_with and found and made_with != found:
        check.misses.append(f"{path.name} was made with another VQVAE than this {g['vae_file']} (state-dict sha256 "
                            f"{made_with[:12]}... recorded, {found[:12]}... found)")
    vae = build_vae(vae_golden)
    check_var_config(g, check)
    gen = load("var", g["state_dict"], scales=g["config"]["patch_nums"]).eval()
    num_classes = g["config"]["num_classes"]

    labels, x, gt = g["label_B"], g["x_BLCv_wo_first_l"], g["gt_BL"]
    logits = gen.head(*gen.backbone(labels, x))
    check.close("logits_BLV", logits, g["logits_BLV"], LOGITS)
    check.close("logits_BLV_uncond", gen.head(*gen.backbone(torch.full_like(labels, num_classes), x)), g["logits_BLV_uncond"], LOGITS)
    smoothing = gen.head.label_smoothing
    for ls, key in ((0.0, "train_loss_ls0"), (0.1, "train_loss_ls0p1")):
        gen.head.label_smoothing = ls
        check.relative(key, gen.head.loss(logits, gt, gen.backbone.scales.offsets)[0], g[key], LOSS_RTOL)
    gen.head.label_smoothing = smoothing

    composition = ResidualComposition(vae)
    for name, run in g["samples"].items():
        check_sampling(gen, composition, num_classes, run, check, f"sample {name}: ")

    exported = export("var", gen)
    check.equal("export_var keys", set(exported), set(g["state_dict"]))
    check.same_tensors("export_var tensors vs the file", exported, g["state_dict"])


def check_sampling(gen, composition, num_classes: int, run: dict, check: Parity, at: str) -> None:
    """One `autoregressive_infer_cfg` call, replayed with the same CPU generator and the same draws."""
    call = run["call"]
    rng = torch.Generator().manual_seed(call["g_seed"])
    if call["label_B"] is None:
        labels = random_labels(call["B"], num_classes, rng)
    else:
        labels = torch.tensor(call["label_B"])
    check.exact("labels_used", labels, run["labels_used"], at)

    seen: dict[str, list] = {"logits_cfg": [], "logits_masked": [], "idx": []}

    def inspect(si: int, name: str, tensor: torch.Tensor) -> None:
        if name in seen:
            seen[name].append(tensor.clone())

    options = GenerateOptions.of(gen.head, cfg_scale=call["cfg"], top_k=call["top_k"], top_p=call["top_p"],
                                 more_smooth=call["more_smooth"])
    f_hat = generate(gen.backbone, gen.head, composition, labels, options, generator=rng, inspect=inspect)
    check.exact("sample.idx_Bl", seen["idx"], run["idx_Bl"], at)
    check.close("sample.logits_cfg", seen["logits_cfg"], run["logits_cfg"], LOGITS, at)
    check.close("sample.logits_masked", seen["logits_masked"], run["logits_masked"], LOGITS, at)
    check.close("sample.f_hat_final", f_hat, run["f_hat_final"], LATENT, at)
    check.close("sample_img", composition.decode(f_hat).add(1).mul(0.5), run["sample_img"], IMAGE, at)
