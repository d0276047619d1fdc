"""Parity with the official FlexVAR code: every golden file in `<parity dir>/flexvar` (see its README.md).

A file is recognised by its content: a tokenizer golden (`per_pn` + `img`), a reconstruction golden
(`decode_per_scale`, made with the tokenizer golden's weights and image), a transformer golden (`per_pn` +
`label_B`) or a sampling golden (`cases`, made with the tokenizer and transformer goldens of the folder). Every
quantity is compared before a test fails; indices exactly, floats within 1e-4 (the largest |diff| per file and
quantity is printed at the end of the module). The goldens were made with 2 torch threads on CPU in float32.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity import Parity, load_golden

from scalegen import official
from scalegen.generation.loop import generate, random_labels
from scalegen.generation.options import GenerateOptions
from scalegen.official.flexvar import OFFICIAL_SIDES, flexvae_config_from_state, flexvar_config_from_state
from scalegen.schedule.direct_vq import DirectVQComposition
from scalegen.schedule.scales import ScaleSchedule, bicubic_up

ATOL = 1e-4  # the bound for every float; indices and generator states are compared exactly

pytestmark = pytest.mark.threads(2)  # the goldens were made with 2 threads (see conftest.py)


def kind(g) -> str | None:
    if not isinstance(g, dict):
        return None
    if "cases" in g:
        return "sampling"
    if "decode_per_scale" in g:
        return "recon"
    if "per_pn" in g and "label_B" in g:
        return "transformer"
    if "per_pn" in g and "img" in g:
        return "tokenizer"
    return None


def golden_of(folder: Path, wanted: str) -> dict:
    """The folder's golden of another kind (the recon and sampling files reuse the tokenizer's/transformer's weights)."""
    found = [load_golden(p) for p in sorted(folder.glob("*.pt")) if kind(load_golden(p)) == wanted]
    assert found, f"no {wanted} golden in {folder}: the recon and sampling goldens are made with its weights"
    return found[0]


def tokenizer_from(g: dict):
    check_cfg = flexvae_config_from_state(g["state_dict"])
    cfg = g["config"]
    assert (check_cfg["vocab_size"], check_cfg["codebook_dim"], check_cfg["ch"], check_cfg["num_res_blocks"]) == (
        cfg["codebook_size"], cfg["codebook_embed_dim"], cfg["ch"], cfg["num_res_blocks"])
    return official.load("flexvae", g["state_dict"], beta=cfg["commit_loss_beta"], l2_norm=cfg["codebook_l2_norm"])


def transformer_from(g: dict, scales):
    return official.load("flexvar", g["state_dict"], scales=scales).eval()


@pytest.mark.parity("flexvar")
def test_golden(golden_file: Path, max_diffs):
    assert golden_file.is_file(), f"no .pt golden files in {golden_file}"
    g = load_golden(golden_file)
    what = kind(g)
    assert what, f"{golden_file.name}: unknown golden format (keys {sorted(g)[:10] if isinstance(g, dict) else type(g)})"
    check = Parity(golden_file.name, max_diffs, atol=ATOL)
    with torch.no_grad():
        {"tokenizer": check_tokenizer, "recon": check_recon, "transformer": check_transformer,
         "sampling": check_sampling}[what](g, golden_file.parent, check)
    check.finish()


# ---- FlexVAE ----------------------------------------------------------------------------------------------------------


def check_tokenizer(g: dict, folder: Path, check: Parity) -> None:
    vae, img = tokenizer_from(g), g["img"]
    check.close("h_encoder", vae.encoder(img), g["h_encoder"])
    latent = vae.encode(img)
    check.close("h_encode_conti", latent, g["h_encode_conti"])
    for pn, d in g["per_pn"].items():
        at = f"pn{''.join(map(str, pn))}."
        comp = DirectVQComposition(vae, pn)
        idx = comp.targets(latent)  # the trainer's path: quant_conv, then area per scale
        check.exact(at + "idx_per_scale", idx, d["idx_per_scale"])
        check.exact(at + "gt_BL", torch.cat(idx, 1), d["gt_BL"])
        check.close(at + "x_BLCv_wo_first_l", comp.teacher_inputs(idx), d["x_BLCv_wo_first_l"])
        # the tokenizer's own path (multi_scale_encode: area, then quant_conv), its tokens and codes
        features = vae.encoder(img)
        encoded = [vae._encode_at(features, (p, p)) for p in pn]
        check.exact(at + "idx_multi_scale_encode", [e[2] for e in encoded], d["idx_per_scale_multi_scale_encode"])
        check.close(at + "quant_multi_scale_encode", [e[0] for e in encoded], d["quant_multi_scale_encode"])
    recon = vae.decode_scales(img, [1, 2, 4])
    check.close("recon_finest", recon[-1], g["recon_finest"])
    check.close("recon_intermediate_pn2", recon[1], g["recon_intermediate_pn2"])
    exported = official.export("flexvae", vae)
    check.equal("export keys", sorted(exported), sorted(g["state_dict"]))
    check.equal("export tensors", [k for k in exported if not torch.equal(exported[k], g["state_dict"][k])], [])


def check_recon(g: dict, folder: Path, check: Parity) -> None:
    tok = golden_of(folder, "tokenizer")
    vae, img, pn = tokenizer_from(tok), tok["img"], list(g["patch_nums"])
    per_scale = vae.decode_scales(img, pn)  # decode(z + (e - z)) of each scale: the official `vae(img, pn)`
    check.close("decode_per_scale", per_scale, g["decode_per_scale"])
    check.close("vae_forward_ms", per_scale, g["vae_forward_ms"])
    final = (16 * pn[-1], 16 * pn[-1])
    check.close("img_to_reconstructed_multi_scale_img", [bicubic_up(r, final) for r in per_scale],
                g["img_to_reconstructed_multi_scale_img"])
    idx = DirectVQComposition(vae, pn).targets(vae.encode(img))
    check.close("decode_code_per_scale", [vae.decode_code(i, (p, p), clamp=False) for i, p in zip(idx, pn)],
                g["decode_code_per_scale"])
    check.close("vae_forward_single", vae.eval()(img)[0], g["vae_forward_single"])


# ---- the transformer ------------------------------------------------------------------------------------------------


def check_transformer(g: dict, folder: Path, check: Parity) -> None:
    cfg = g["config"]
    inferred = flexvar_config_from_state(g["state_dict"], cfg["patch_nums"])
    for ours, theirs in dict(depth="depth", width="embed_dim", num_heads="num_heads", num_classes="num_classes",
                             shared_aln="shared_aln", attn_l2_norm="attn_l2_norm").items():
        check.equal(f"inferred {ours}", inferred[ours], cfg[theirs])
    gen = transformer_from(g, cfg["patch_nums"])
    bb, labels = gen.backbone, g["label_B"]
    for pn, d in g["per_pn"].items():
        at = f"pn{''.join(map(str, pn))}."
        sched = ScaleSchedule.of(pn)  # the official forward(label_B, x, infer_patch_nums) takes the list per call
        seen = {}
        hook = bb.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("block0", args[0].clone()))
        hidden, cond = bb(labels, d["x_BLCv_wo_first_l"], sched)
        hook.remove()
        logits = gen.head(hidden, cond)
        check.close(at + "block0_input", seen["block0"], d["block0_input"])
        check.close(at + "cond_BD", cond, d["cond_BD"])
        check.close(at + "logits", logits, d["logits"])
        check.close(at + "loss", gen.head.loss(logits, d["gt_BL"], sched.offsets)[0].reshape(()), d["loss"])
        check.exact(at + "attn_bias_for_masking", bb.attention_bias(sched).view_as(d["attn_bias_for_masking"]), d["attn_bias_for_masking"])
    exported = official.export("flexvar", gen)
    check.equal("export keys", sorted(exported), sorted(g["state_dict"]))
    check.equal("export tensors", [k for k in exported if not torch.equal(exported[k], g["state_dict"][k])], [])


# ---- sampling -------------------------------------------------------------------------------------------------------


def check_sampling(g: dict, folder: Path, check: Parity) -> None:
    tok, tr = golden_of(folder, "tokenizer"), golden_of(folder, "transformer")
    vae, gen = tokenizer_from(tok), transformer_from(tr, tr["config"]["patch_nums"])
    num_classes = tr["config"]["num_classes"]
    for name, case in g["cases"].items():
        check_case(vae, gen, num_classes, case, check, f"{name}.")


def check_case(vae, gen, num_classes: int, case: dict, check: Parity, at: str) -> None:
    """One `autoregressive_infer_cfg` call, replayed with the same CPU generator: official options = ours."""
    k = case["kwargs"]
    rng = torch.Generator().manual_seed(k["g_seed"])
    labels = random_labels(k["B"], num_classes, rng) if k["label"] is None else torch.tensor(k["label"])
    seen = {"head": [], "logits_cfg": [], "logits_masked": [], "idx": [], "rng": [], "inputs": []}

    def inspect(si, name, tensor):
        if name == "logits_cfg":
            seen["rng"].append(rng.get_state())  # the state the multinomial draw starts from
        if name in seen:
            seen[name].append(tensor.clone())

    hooks = [gen.head.register_forward_hook(lambda m, a, out: seen["head"].append(out.clone())),
             gen.backbone.word_embed.register_forward_pre_hook(lambda m, a: seen["inputs"].append(a[0].clone()))]
    llamagen = k["used_llamagen_cfg"]
    composition = DirectVQComposition(vae, gen.backbone.scales)
    try:
        options = GenerateOptions.of(
            gen.head, cfg_scale=k["cfg"], cfg_schedule="constant" if llamagen else "linear",
            cfg_mix="llamagen" if llamagen else "var", top_k=k["top_k"], top_p=k["top_p"], scales=k["infer_patch_nums"],
            ratio_steps=9, max_side=k["max_pn"], trained_sides=OFFICIAL_SIDES)
        codes = generate(gen.backbone, gen.head, composition, labels, options, generator=rng, inspect=inspect)
    finally:
        for h in hooks:
            h.remove()
    check.exact(at + "idx_per_step", seen["idx"], case["idx_per_step"])
    check.exact(at + "rng_state_before_each_sample", seen["rng"], case["rng_state_before_each_sample"])
    check.close(at + "head_logits_per_step", seen["head"], case["head_logits_per_step"])
    check.close(at + "cfg_logits_per_step", seen["logits_cfg"], case["cfg_logits_per_step"])
    if "filtered_logits_per_step" in case:
        check.close(at + "filtered_logits_per_step", seen["logits_masked"], case["filtered_logits_per_step"])
    check.close(at + "word_embed_input_per_step", seen["inputs"], case["word_embed_input_per_step"])
    check.close(at + "image", vae.decode(codes.contiguous(), clamp=False), case["image"])
    greedy = [kw["top_k"] == 1 and k["top_k"] != 1 for kw in case["sampler_kwargs_per_step"]]
    ours = [bool(max(p, p) > k["max_pn"] or p not in OFFICIAL_SIDES) for p in k["infer_patch_nums"]]
    check.equal(at + "greedy steps", ours, greedy)
    check.equal(at + "schedule restored", gen.backbone.scales.sizes, tuple((p, p) for p in (1, 2, 3, 4)))
