"""Convert official releases to scalegen safetensors (and back).

    python -m scalegen.official.convert var  var_d16.pth            -o var_d16.safetensors
    python -m scalegen.official.convert mvar d16.pth                -o mvar_d16.safetensors   # OliverRen/M-VAR
    python -m scalegen.official.convert vae  vae_ch160v4096z32.pth  -o vae_ch160v4096z32.safetensors
    python -m scalegen.official.convert flowar FlowAR-S.pth         -o flowar_s.safetensors   # and kl16 kl16.ckpt
    python -m scalegen.official.convert flexvar FlexVARd16-epo179.pth -o flexvar_d16.safetensors   # and flexvae FlexVAE.pth
    python -m scalegen.official.convert var  var_d16.safetensors    -o var_d16.pth --to-official

Each file is loaded with weights_only=True, every key is mapped by the release's table (scalegen.official.var),
the model is built and loaded strictly (missing/unexpected keys are listed), and the architecture is stored
in the safetensors metadata so `scalegen.pretrained.load_generator` rebuilds it without flags.
"""
from __future__ import annotations

import argparse
import json

import torch

from scalegen.io import atomic_write, read_checkpoint, read_meta, save_safetensors
from scalegen.official import flexvar, flowar
from scalegen.official.mvar import build_mvar, export_mvar, load_mvar, mvar_config_from_state
from scalegen.official.var import (
    build_var,
    export_vae,
    export_var,
    load_vae,
    load_var,
    vae_config_from_state,
    var_config_from_state,
)
from scalegen.schedule.scales import VAR_256
from scalegen.tokenizers import MultiScaleVQVAE

KINDS = ("var", "mvar", "vae", "flexvar", "flexvae", "flowar", "kl16")
FLEX_KINDS = ("flexvar", "flexvae")  # FlexVAR's transformer and tokenizer: scalegen.official.flexvar
FLOWAR_KINDS = ("flowar", "kl16")  # FlowAR-{S,L,H}.pth and MAR's kl16.ckpt: scalegen.official.flowar




def to_scalegen(kind: str, src: str, dst: str, scales=None) -> None:
    if kind in FLEX_KINDS:
        return flexvar.to_scalegen(kind, src, dst, scales)
    if kind in FLOWAR_KINDS:
        return flowar.to_scalegen(kind, src, dst, scales)
    state = read_checkpoint(src)
    if kind == "var":
        config = var_config_from_state(state, scales)
        model = load_var(state, config)
    elif kind == "mvar":  # M-VAR: VAR's keys + a Mamba2 per block; attn_l2_norm read from the keys
        config = mvar_config_from_state(state, scales)
        model = load_mvar(state, config)
    else:
        config = vae_config_from_state(state, **({"v_patch_nums": tuple(scales)} if scales else {}))
        stats = state.get("quantize.ema_vocab_hit_SV")
        if stats is not None and stats.shape[0] != len(config.get("v_patch_nums", VAR_256)):
            raise ValueError(f"{src}: quantize.ema_vocab_hit_SV holds statistics of {stats.shape[0]} scales: give the "
                             "tokenizer's schedule with --scales (e.g. --scales 1,2,3,4)")
        model = load_vae(state, config)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    save_safetensors(model.state_dict(), dst, metadata={"kind": kind, "config": json.dumps(config)})
    print(f"{src}: {sum(p.numel() for p in model.parameters()):,} parameters -> {dst}")


def to_official(kind: str, src: str, dst: str) -> None:
    if kind in FLEX_KINDS:
        return flexvar.to_official(kind, src, dst)
    if kind in FLOWAR_KINDS:
        return flowar.to_official(kind, src, dst)
    from safetensors.torch import load_file
    meta = read_meta(src)
    if meta.get("kind") != kind:
        raise ValueError(f"{src} holds kind {meta.get('kind')!r}, not {kind!r}")
    if kind == "var":
        model = build_var(meta["config"])
        model.load_state_dict(load_file(src), strict=True)
        state = export_var(model)
    elif kind == "mvar":
        model = build_mvar(meta["config"])
        model.load_state_dict(load_file(src), strict=True)
        state = export_mvar(model)
    else:
        model = MultiScaleVQVAE(**meta["config"])
        model.load_state_dict(load_file(src), strict=True)
        state = export_vae(model)
    atomic_write(dst, lambda tmp: torch.save(state, tmp))
    print(f"{src} -> {dst} ({len(state)} official keys)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("src")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--scales", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="the schedule, when not a VAR preset (e.g. 1,2,3,4)")
    parser.add_argument("--to-official", action="store_true", help="scalegen safetensors -> official .pth layout")
    args = parser.parse_args(argv)
    if args.to_official:
        to_official(args.kind, args.src, args.out)
    else:
        to_scalegen(args.kind, args.src, args.out, args.scales)


if __name__ == "__main__":
    main()
