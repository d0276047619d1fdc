"""Parity with the official M-VAR code: every golden file in `<parity dir>/mvar` (see its README.md).

Per file: the inferred architecture (attn_l2_norm from the keys), the teacher-forced logits in train mode and in
eval mode (the official eval forward crashes / attends across scales; ours must equal the train-mode target), the
per-block intermediates, the export back to the official layout, and both seeded sampling runs through the
state-cached generation: same seed -> the same indices at every scale, the same CFG logits, f_hat and image.
The tiny VQVAE is rebuilt from the README's per-key seed rule and checked against the stored checksums first.
Goldens were made with one thread; the max |ours - golden| per file and quantity is printed at the end.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity import Parity, keyed_vae_state, load_golden

from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions
from scalegen.official import export, load
from scalegen.official.mvar import mvar_config_from_state
from scalegen.schedule.residual import ResidualComposition

ATOL = 1e-4  # the float tolerance; indices exact

pytestmark = pytest.mark.threads(1)  # the goldens were made with 1 thread (see conftest.py)


def golden_model(g: dict):
    cfg = g["config"]
    return load("mvar", g["state_dict"], drop_path_rate=cfg["drop_path_rate"])


@pytest.mark.parity("mvar")
def test_golden(golden_file: Path, max_diffs):
    assert golden_file.is_file(), f"no .pt golden files in {golden_file}"
    g = load_golden(golden_file)
    check = Parity(golden_file.name, max_diffs, atol=ATOL)
    cfg = g["config"]

    inferred = mvar_config_from_state(g["state_dict"])
    expected = dict(depth=cfg["depth"], width=cfg["embed_dim"], num_heads=cfg["num_heads"], attn_l2_norm=cfg["attn_l2_norm"],
                    shared_aln=cfg["shared_aln"], num_classes=cfg["num_classes"], d_state=cfg["_mamba2"]["d_state"],
                    d_conv=cfg["_mamba2"]["d_conv"], expand=cfg["_mamba2"]["expand"], headdim=cfg["_mamba2"]["headdim"],
                    scales=tuple((p, p) for p in cfg["patch_nums"]))
    for key, value in expected.items():
        if inferred[key] != value:
            check.misses.append(f"inferred config {key}: {inferred[key]!r}, golden {value!r}")

    gen = golden_model(g)
    labels, x = g["label_B"], g["x_BLCv_wo_first_l"]
    with torch.no_grad():
        seen = {}
        hooks = []
        for i, block in enumerate(gen.backbone.blocks):
            hooks += [block.attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"blocks.{i}.attn_out", out.clone())),  # scaled in place next
                      block.mamba.register_forward_hook(lambda m, a, out, i=i: seen.update({f"blocks.{i}.mamba_in": a[0],
                                                                                          f"blocks.{i}.mamba_out": out})),
                      block.mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"blocks.{i}.ffn_out", out)),
                      block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"blocks.{i}.block_out", out))]
        gen.train()
        check.close("logits_BLV (train mode)", gen.head(*gen.backbone(labels, x)), g["logits_BLV"])
        for h in hooks:
            h.remove()
        for name, ref in g["intermediates"].items():
            check.close(f"intermediates.{name.split('.', 2)[-1]}", seen[name], ref)
        gen.eval()  # the official eval forward crashes or attends across scales; ours computes the target
        check.close("logits_BLV (eval mode)", gen.head(*gen.backbone(labels, x)), g["logits_BLV"])

    exported = export("mvar", gen)
    if set(exported) != set(g["state_dict"]):
        check.misses.append(f"export keys differ: {sorted(set(exported) ^ set(g['state_dict']))[:6]}")
    else:
        differ = [k for k, v in g["state_dict"].items() if not torch.equal(exported[k], v)]
        if differ:
            check.misses.append(f"export tensors differ: {differ[:6]}")

    vae_state = keyed_vae_state(g)
    for key, (total, abs_total, _) in g["vqvae_key_checksums"].items():
        v = vae_state[key].double()
        if abs(v.sum().item() - total) > 1e-6 * max(1.0, abs_total) or abs(v.abs().sum().item() - abs_total) > 1e-6 * max(1.0, abs_total):
            check.misses.append(f"regenerated VQVAE tensor {key} fails its checksum")
    for key, ref in g["vqvae_small_state"].items():
        if not torch.equal(vae_state[key], ref):
            check.misses.append(f"regenerated VQVAE tensor {key} differs from vqvae_small_state")
    vae = load("vae", vae_state, v_patch_nums=tuple(cfg["patch_nums"]))
    composition = ResidualComposition(vae)
    with torch.no_grad():
        check.exact("gt_idx_Bl (tokenizer)", vae.img_to_idx(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1),
                    g["gt_idx_Bl"])
        check.close("x_BLCv_wo_first_l (tokenizer)", composition.teacher_inputs(g["gt_idx_Bl"]), x)
        for name, run in g["samples"].items():
            check_sampling(gen.eval(), composition, run, check, f"sample {name}: ")
    check.finish()


def check_sampling(gen, composition, run: dict, check: Parity, at: str) -> None:
    """One `autoregressive_infer_cfg` call, replayed through the state cache with the same CPU generator."""
    call = run["call"]
    rng = torch.Generator().manual_seed(call["g_seed"])
    seen: dict[str, list] = {"logits_cfg": [], "idx": []}

    def inspect(si: int, name: str, tensor: torch.Tensor) -> None:
        if name in seen:
            seen[name].append(tensor.clone())

    options = GenerateOptions.of(gen.head, cfg_scale=call["cfg"], top_k=call["top_k"], top_p=call["top_p"],
                                 more_smooth=call["more_smooth"])
    f_hat = generate(gen.backbone, gen.head, composition, torch.tensor(call["label_B"]), options, generator=rng,
                     inspect=inspect)
    check.exact(at + "idx_Bl", seen["idx"], run["idx_Bl"])
    check.close(at + "logits_cfg_BlV", seen["logits_cfg"], run["logits_cfg_BlV"])
    check.close(at + "f_hat", f_hat, run["f_hat"])
    check.close(at + "img_B3HW", composition.decode(f_hat).add(1).mul(0.5), run["img_B3HW"])
