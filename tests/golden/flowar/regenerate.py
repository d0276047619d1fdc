"""Regenerate tests/golden/flowar from OliverRensu/FlowAR at 21835c01810251b1a466dfb2a697c412927e9c69 (README.md here;
its models/vae.py is LTH14/mar's at fe470ac24afbee924668d8c5c83e9fec60af3a73, byte for byte).

    python tests/golden/flowar/regenerate.py --repo ~/src/FlowAR --out /tmp/golden_flowar

With the official classes and the stored weights/inputs: flowar.pt and flowar_cross.pt (teacher-forced training
loss under manual_seed(2024), the flow head's velocity, sample_tokens under manual_seed(0)), kl_vae.pt (posterior
moments, the seeded posterior sample, the decoder on the mean). Tensor.cuda is a no-op so the code runs on CPU
(the official GPU run draws the same tensors on the CPU generator, then moves them). 1 thread, CPU, float32.
"""
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regen import compare, parse, save, stored  # noqa: E402

COMMIT = "21835c01810251b1a466dfb2a697c412927e9c69"
args = parse("flowar", "https://github.com/OliverRensu/FlowAR", COMMIT, __doc__, threads=1)
torch.Tensor.cuda = lambda self, *a, **k: self  # flowar.py:346-347, 390, 392, 412 and rope.py:117 call .cuda()
import models.vae as vae_module  # noqa: E402  (the official checkout, put on sys.path by parse)
from models.flowar import FlowAR  # noqa: E402

for name in ("flowar.pt", "flowar_cross.pt"):
    d = stored("flowar", name)
    m = FlowAR(**d["config"], norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    m.load_state_dict(d["state_dict"], strict=True)
    new = dict(d)
    with torch.no_grad():
        m.train()
        torch.manual_seed(2024)
        new["forward"] = dict(d["forward"], loss=m(d["latents"], d["label"]))
        vel = d["velocity"]
        new["velocity"] = dict(vel, v=m.flownet(vel["x_t"], vel["t"], vel["condition"]))
        m.eval()
        torch.manual_seed(0)
        s = d["sample"]
        new["sample"] = dict(s, tokens=m.sample_tokens(num_steps=s["num_steps"], guidance=0.9, cfg=s["cfg"],
                                                       labels=s["labels"]))
    print(name), compare(name, new, d), save(new, args.out, name)

d = stored("flowar", "kl_vae.pt")
c = d["config"]
built = {}
for part, attn in (("Encoder", c["enc_attn_resolutions"]), ("Decoder", c["dec_attn_resolutions"])):
    # AutoencoderKL hard-codes ch=128 (vae.py:Encoder/Decoder defaults): bind the tiny width while it is built
    built[part] = getattr(vae_module, part)
    setattr(vae_module, part, functools.partial(built[part], ch=c["ch"], num_res_blocks=c["num_res_blocks"],
                                                attn_resolutions=tuple(attn), resolution=c["resolution"],
                                                dropout=c["dropout"]))
vae = vae_module.AutoencoderKL(embed_dim=c["embed_dim"], ch_mult=tuple(c["ch_mult"]),
                               use_variational=c["use_variational"])
for part, cls in built.items():
    setattr(vae_module, part, cls)
vae.load_state_dict(d["state_dict"], strict=True)
vae.eval()
with torch.no_grad():
    post = vae.encode(d["img"])
    new = dict(d, posterior_moments=post.parameters, posterior_mean=post.mean, posterior_logvar=post.logvar,
               posterior_std=post.std, recon_from_mean=vae.decode(post.mean))
    torch.manual_seed(0)
    new["posterior_sample"] = post.sample()
print("kl_vae.pt"), compare("kl_vae", new, d), save(new, args.out, "kl_vae.pt")
