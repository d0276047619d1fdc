"""Regenerate tests/golden/flexvar from jiaosiyu1999/FlexVAR at 04462cb6e1bbb4524bfcafcd5c5701894a3ac7d1 (README.md here).

    pip install typed-argument-parser pytz      # the official trainer.py imports utils/arg_util.py
    python tests/golden/flexvar/regenerate.py --repo ~/src/FlexVAR --out /tmp/golden_flexvar

With the official classes and the stored weights/inputs: tokenizer_tiny.pt (the official VQModel with its
Encoder/Decoder rebuilt at the tiny width, continuous features, the trainer's per-scale tokens and teacher-forcing
inputs), transformer_tiny.pt (logits and loss for scales (1,2,3,4) and (1,2,4)), sampling_tiny.pt (cases A-E of
autoregressive_infer_cfg). 2 threads, CPU, float32.
"""
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regen import compare, parse, save, stored  # noqa: E402

COMMIT = "04462cb6e1bbb4524bfcafcd5c5701894a3ac7d1"
args = parse("flexvar", "https://github.com/jiaosiyu1999/FlexVAR", COMMIT, __doc__, threads=2)
cwd = os.getcwd()
os.chdir(args.repo)  # utils/arg_util.py:97-99 runs git in the working directory at import time
from models.flexvar import FlexVAR  # noqa: E402  (the official checkout, put on sys.path by parse)
from models.vq_llama import Decoder, Encoder, ModelArgs, VQModel  # noqa: E402
from trainer import VARTrainer  # noqa: E402

os.chdir(cwd)

tok = stored("flexvar", "tokenizer_tiny.pt")
c = dict(tok["config"])
ch, blocks = c.pop("ch"), c.pop("num_res_blocks")
vae = VQModel(ModelArgs(**c))
# VQModel hard-codes ch=128, num_res_blocks=2 (vq_llama.py:33-34): the official Encoder/Decoder at the tiny width
vae.encoder = Encoder(ch=ch, ch_mult=c["encoder_ch_mult"], num_res_blocks=blocks, z_channels=c["z_channels"], dropout=0.0)
vae.decoder = Decoder(ch=ch, ch_mult=c["decoder_ch_mult"], num_res_blocks=blocks, z_channels=c["z_channels"], dropout=0.0)
vae.load_state_dict(tok["state_dict"], strict=True)
vae.eval()
stub = types.SimpleNamespace(vae_local=vae)
with torch.no_grad():
    img = tok["img"]
    new = dict(tok, h_encode_conti=vae.encode_conti(img), h_encoder=vae.encoder(img), per_pn={})
    for pn, old in tok["per_pn"].items():
        x, gt = VARTrainer.encode_var_wo_firstL(stub, img, list(pn))  # trainer.py:57-86
        new["per_pn"][pn] = dict(old, x_BLCv_wo_first_l=x, gt_BL=gt)
print("tokenizer_tiny.pt"), compare("tokenizer", new, tok), save(new, args.out, "tokenizer_tiny.pt")

tr = stored("flexvar", "transformer_tiny.pt")
var = FlexVAR(vae_local=vae, **tr["config"], flash_if_available=False, fused_if_available=False)
var.load_state_dict(tr["state_dict"], strict=True)
var.eval()
var.cond_drop_rate = 0.0  # forward drops labels in eval mode too (flexvar.py:269); rand(B) is still drawn
with torch.no_grad():
    new = dict(tr, per_pn={})
    for pn, old in tr["per_pn"].items():
        logits = var(tr["label_B"], old["x_BLCv_wo_first_l"], list(pn))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), old["gt_BL"].view(-1))
        new["per_pn"][pn] = dict(old, logits=logits, loss=loss)
print("transformer_tiny.pt"), compare("transformer", new, tr), save(new, args.out, "transformer_tiny.pt")

sm = stored("flexvar", "sampling_tiny.pt")
with torch.no_grad():
    new = dict(sm, cases={})
    for case, old in sm["cases"].items():
        kw = dict(old["kwargs"])
        label = kw.pop("label")
        var.update_patch_related(kw["infer_patch_nums"])  # as eval_c2i.py:75
        image = var.autoregressive_infer_cfg(vqvae=vae, label_B=None if label is None else torch.tensor(label),
                                             more_smooth=False, **kw)
        new["cases"][case] = dict(old, image=image)
print("sampling_tiny.pt"), compare("sampling", new, sm), save(new, args.out, "sampling_tiny.pt")
