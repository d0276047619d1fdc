"""Regenerate tests/golden/var from FoundationVision/VAR at 78b95394fc5896192e3a003e4b295f8ea743c48f (README.md here).

    python tests/golden/var/regenerate.py --repo ~/src/VAR --out /tmp/golden_var

Recomputes, with the official classes and the stored weights/inputs: vqvae_tiny.pt (encoder, f, indices, f_hat,
reconstruction; the VQVAE's encoder/decoder rebuilt at the tiny width with the official Encoder/Decoder),
quant10.pt (the quantizer at the 10-scale schedule, each φ-sharing variant) and var_tiny_{aln,saln}.pt
(teacher-forced logits and the three seeded sampling runs). 2 threads, CPU, float32, as the goldens.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regen import compare, parse, save, stored  # noqa: E402

COMMIT = "78b95394fc5896192e3a003e4b295f8ea743c48f"
args = parse("var", "https://github.com/FoundationVision/VAR", COMMIT, __doc__, threads=2)
from models.basic_vae import Decoder, Encoder  # noqa: E402  (the official checkout, put on sys.path by parse)
from models.quant import VectorQuantizer2  # noqa: E402
from models.var import VAR  # noqa: E402
from models.vqvae import VQVAE  # noqa: E402


def build_vqvae(g: dict) -> VQVAE:
    cfg = dict(g["config"])
    dd = cfg.pop("ddconfig")
    vae = VQVAE(**cfg)
    full = dict(dropout=0.0, ch=cfg["ch"], z_channels=cfg["z_channels"], **dd)  # the width override (README §1)
    vae.encoder, vae.decoder = Encoder(double_z=False, **full), Decoder(**full)
    vae.load_state_dict(g["state_dict"], strict=True)
    return vae.eval()


with torch.no_grad():
    g = stored("var", "vqvae_tiny.pt")
    vae = build_vqvae(g)
    img = g["img"]
    new = dict(g, enc_out=vae.encoder(img), f=vae.quant_conv(vae.encoder(img)), idx_Bl=vae.img_to_idxBl(img))
    new["gt_BL"] = torch.cat(new["idx_Bl"], 1)
    new["x_BLCv_wo_first_l"] = vae.quantize.idxBl_to_var_input(new["idx_Bl"])
    new["fhat_list"] = vae.quantize.f_to_idxBl_or_fhat(new["f"], to_fhat=True)
    new["fhat"] = new["fhat_list"][-1]
    new["recon"] = vae.idxBl_to_img(new["idx_Bl"], same_shape=True, last_one=True)
    print("vqvae_tiny.pt"), compare("vqvae", new, g), save(new, args.out, "vqvae_tiny.pt")

    q = stored("var", "quant10.pt")
    newq = dict(q, variants={})
    print("quant10.pt")
    for name, v in q["variants"].items():
        quant = VectorQuantizer2(**v["config"])
        quant.load_state_dict(v["state_dict"], strict=True)
        quant.eval()
        out = dict(v, idx_Bl=quant.f_to_idxBl_or_fhat(q["f"], to_fhat=False),
                   fhat_list=quant.f_to_idxBl_or_fhat(q["f"], to_fhat=True))
        out["x_BLCv_wo_first_l"] = quant.idxBl_to_var_input(out["idx_Bl"])
        compare(name, out, v)
        newq["variants"][name] = out
    save(newq, args.out, "quant10.pt")

    for name in ("var_tiny_aln.pt", "var_tiny_saln.pt"):
        d = stored("var", name)
        var = VAR(vae_local=vae, **d["config"])
        var.load_state_dict(d["state_dict"], strict=True)
        var.eval()
        var.cond_drop_rate = 0.0  # forward drops labels in eval mode too (var.py:201); rand(B) is still drawn
        x, label = d["x_BLCv_wo_first_l"], d["label_B"]
        new = dict(d, logits_BLV=var(label, x), logits_BLV_uncond=var(torch.full_like(label, 10), x), samples={})
        for case, s in d["samples"].items():
            call = dict(s["call"])
            if call.get("label_B") is not None:
                call["label_B"] = torch.as_tensor(call["label_B"])
            new["samples"][case] = dict(s, sample_img=var.autoregressive_infer_cfg(**call))
        new["sample_img"] = new["samples"]["main"]["sample_img"]
        print(name), compare(name, new, d), save(new, args.out, name)
