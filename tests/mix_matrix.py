"""The mix matrix as data: tokenizer kind x backbone x head x composition, and which cells are meaningful.

A categorical head predicts code indices, so it needs a composition that gives them from a tokenizer that has them
(VAR's residual quantizer with `residual`, FlexVAR's single-scale VQ with `direct_vq`); a flow head regresses
latents, so it takes `direct` with any tokenizer (a VQ tokenizer's latent before quantisation). Every backbone pairs
with every meaningful (tokenizer, composition, head): backbones see only token features and a schedule.
"""
from __future__ import annotations

import itertools

TOKENIZERS = {"residual": "msvq_digits", "single-scale VQ": "flexvae_digits", "continuous": "kl_digits"}
BACKBONES = {"adaln": (), "flexvar": (), "mvar": ("backbone.headdim=32", "backbone.d_state=16"),
             "mvar_flex": ("backbone.headdim=32", "backbone.d_state=16"), "flowar": ()}
HEADS = {"categorical": (), "flow": ("head.flow_width=32", "head.depth=1", "head.num_steps=2")}
COMPOSITIONS = ("residual", "direct_vq", "direct")

# (tokenizer kind, composition, head): the meaningful triples; the backbone is free
MEANINGFUL = {
    ("residual", "residual", "categorical"),         # VAR, M-VAR
    ("single-scale VQ", "direct_vq", "categorical"),  # FlexVAR
    ("continuous", "direct", "flow"),                 # FlowAR
    ("residual", "direct", "flow"),                   # a VQ tokenizer's latent, regressed
    ("single-scale VQ", "direct", "flow"),
}


def cells():
    """Every cell: (tokenizer kind, backbone, head, composition)."""
    return list(itertools.product(TOKENIZERS, BACKBONES, HEADS, COMPOSITIONS))


def meaningful(cell) -> bool:
    tok, _, head, comp = cell
    return (tok, comp, head) in MEANINGFUL


def overrides(cell) -> list[str]:
    """The tiny train.py overrides of a cell (VAR's recipe with the cell's parts, on the digits)."""
    tok, backbone, head, comp = cell
    return ["model=var", f"tokenizer={TOKENIZERS[tok]}", f"backbone={backbone}", f"head={head}", f"composition={comp}",
            "backbone.depth=1", "backbone.width=32", "backbone.num_heads=2", *BACKBONES[backbone], *HEADS[head]]


def fixes(cell) -> list[list[str]]:
    """The smallest sets of overrides (of tokenizer, head, composition) that turn a refused cell meaningful."""
    tok, backbone, head, comp = cell
    now = dict(tokenizer=tok, head=head, composition=comp)
    axes = {"tokenizer": list(TOKENIZERS), "head": list(HEADS), "composition": list(COMPOSITIONS)}
    for n in (1, 2):
        found = []
        for keys in itertools.combinations(axes, n):
            for values in itertools.product(*(axes[k] for k in keys)):
                new = {**now, **dict(zip(keys, values))}
                if any(new[k] == now[k] for k in keys) or not meaningful((new["tokenizer"], backbone, new["head"],
                                                                           new["composition"])):
                    continue
                found.append([f"{k}={TOKENIZERS[v] if k == 'tokenizer' else v}" for k, v in zip(keys, values)])
        if found:
            return found
    return []
