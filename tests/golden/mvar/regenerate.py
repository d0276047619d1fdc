"""Regenerate tests/golden/mvar from OliverRensu/MVAR at 80768a1ff79153e5d7b19fab28e660436604253d (README.md here).

    pip install mamba-ssm==2.3.2.post1 (MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE: pure Python)
    python tests/golden/mvar/regenerate.py --repo ~/src/MVAR --out /tmp/golden_mvar

The official code runs on CPU with the substitutions README.md lists ("What was patched"): a CPU stand-in for
flash_attn (plain softmax attention, per cu_seqlens segment) and mamba_ssm's reference (pure PyTorch) functions.
The tiny VQVAE is VAR's class with every tensor drawn from its key (the keyed rule); the MVAR weights and the
inputs are the stored ones. Recomputes the teacher-forced logits (train mode, cond_drop_rate 0) and the two seeded
sampling runs. 1 thread, CPU, float32.
"""
import sys
import types
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regen import compare, parse, save, stored  # noqa: E402

COMMIT = "80768a1ff79153e5d7b19fab28e660436604253d"
args = parse("mvar", "https://github.com/OliverRensu/MVAR", COMMIT, __doc__, threads=1)


def _attend(q, k, v, scale):  # (B, L, H, D), non-causal, float32 softmax, dropout 0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    w = torch.einsum("blhd,bmhd->bhlm", q.float() * scale, k.float()).softmax(-1)
    return torch.einsum("bhlm,bmhd->blhd", w, v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    return _attend(q, k, v, softmax_scale)


def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    outs = [_attend(q[None, a:b], k[None, c:d], v[None, c:d], softmax_scale)[0]
            for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())]
    return torch.cat(outs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    return _attend(*qkv.unbind(2), softmax_scale)


shim = types.ModuleType("flash_attn")  # no flash_attn.ops: the fused MLP/LN imports fail as the official code expects
shim.flash_attn_func, shim.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
shim.flash_attn_qkvpacked_func = flash_attn_qkvpacked_func
sys.modules["flash_attn"] = shim
sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")  # imported unconditionally by mamba_ssm
from mamba_ssm.modules import mamba2  # noqa: E402
from mamba_ssm.ops import selective_scan_interface  # noqa: E402
from mamba_ssm.ops.triton import layernorm_gated, ssd_combined  # noqa: E402

ssd_combined.causal_conv1d_fn = lambda x, weight, bias=None, activation=None, **_: F.silu(
    F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight[:, None] if weight.dim() == 2 else weight, bias,
             groups=x.shape[1]))
selective_scan_interface.selective_scan_fn = selective_scan_interface.selective_scan_ref
ssd_combined.rmsnorm_fn = layernorm_gated.rms_norm_ref
mamba2.mamba_split_conv1d_scan_combined = ssd_combined.mamba_split_conv1d_scan_ref

from models.mvar import MVAR  # noqa: E402  (the official checkout, put on sys.path by parse)
from models.vqvae import VQVAE  # noqa: E402


def keyed(key: str, shape) -> torch.Tensor:
    """The tiny VQVAE's tensors, each drawn from its own key (README "Tiny-VQVAE weights")."""
    r = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8"))))
    module = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
    if key.endswith("ema_vocab_hit_SV"):
        return torch.zeros(shape)
    if module.startswith("norm"):
        return 1 + 0.1 * r if key.endswith("weight") else 0.1 * r
    if key == "quantize.embedding.weight":
        return 0.5 * r
    if key.endswith(".weight"):
        return r / (shape[1] * shape[2] * shape[3]) ** 0.5
    return 0.02 * r


d = stored("mvar", "mvar_tiny_nol2.pt")
torch.manual_seed(0)
vae = VQVAE(**d["config"]["vqvae"], v_patch_nums=d["config"]["patch_nums"])
vae.load_state_dict({k: keyed(k, v.shape) for k, v in vae.state_dict().items()}, strict=True)
compare("vqvae_small_state", {k: vae.state_dict()[k] for k in d["vqvae_small_state"]}, d["vqvae_small_state"])
config = {k: v for k, v in d["config"].items() if not k.startswith("_") and k != "vqvae"}
mvar = MVAR(vae_local=vae, **config)
mvar.load_state_dict(d["state_dict"], strict=True)
with torch.no_grad():
    mvar.train()
    mvar.cond_drop_rate = 0.0  # MVAR.forward draws rand(B) for label dropout in any mode (mvar.py:225)
    new = dict(d, logits_BLV=mvar(d["label_B"], d["x_BLCv_wo_first_l"]), samples={})
    mvar.eval()
    for case, s in d["samples"].items():
        call = dict(s["call"], label_B=torch.as_tensor(s["call"]["label_B"]))
        new["samples"][case] = dict(s, img_B3HW=mvar.autoregressive_infer_cfg(**call))
compare("mvar_tiny_nol2", new, d)
save(new, args.out, "mvar_tiny_nol2.pt")
