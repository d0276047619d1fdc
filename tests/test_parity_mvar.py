"""Parity with the official M-VAR code: every golden file in `<parity dir>/mvar` (see its README.md).

Per file: the inferred architecture (attn_l2_norm from the keys), the teacher-forced logits in train mode and in
eval mode (the official eval forward crashes / attends across scales; ours must equal the train-mode target), the
per-block intermediates, the export back to the official layout, and both seeded sampling runs through the
state-cached generation: same seed -> the same indices at every scale, the same CFG logits, f_hat and image.
The tiny VQVAE is rebuilt from the README's per-key seed rule and checked against the stored checksums first.
Goldens were made with one thread; the max |ours - golden| per file and quantity is printed at the end.
"""
from __future__ import annotations

import functools
import zlib
from pathlib import Path

import pytest
import torch

from scalegen.schedule.residual import ResidualComposition
from scalegen.official.mvar import export_mvar, load_mvar, mvar_config_from_state
from scalegen.official.var import load_vae
from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions

ATOL = 1e-4  # the float tolerance; indices exact


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the goldens were made with 1 thread (README)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def max_diffs(request):
    table: dict = {}
    yield table
    if table:
        lines = ["", "M-VAR parity: max |ours - golden| (CPU, float32, 1 thread)"]
        lines += [f"  {f:<22}{q:<40}{d:.3g}" for (f, q), d in sorted(table.items())]
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n".join(lines))


@functools.lru_cache(maxsize=None)
def load_golden(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Check:
    def __init__(self, file: str, table: dict):
        self.file, self.table, self.misses = file, table, []

    def close(self, what: str, ours, ref) -> None:
        pairs = list(zip(ours, ref)) if isinstance(ref, (list, tuple)) else [(ours, ref)]
        if isinstance(ref, (list, tuple)) and len(ours) != len(ref):
            self.misses.append(f"{what}: {len(ours)} entries, golden {len(ref)}")
            return
        worst = 0.0
        for a, b in pairs:
            if a.shape != b.shape:
                self.misses.append(f"{what}: shape {tuple(a.shape)}, golden {tuple(b.shape)}")
                return
            finite = b.isfinite()
            if not torch.equal(a.isfinite(), finite) or not torch.equal(a[~finite], b[~finite]):
                self.misses.append(f"{what}: infinite entries differ")
                return
            worst = max(worst, (a.double() - b.double())[finite].abs().max().item() if finite.any() else 0.0)
        self.table[(self.file, what)] = max(worst, self.table.get((self.file, what), 0.0))
        if not worst <= ATOL:
            self.misses.append(f"{what}: max |diff| {worst:.3g} > {ATOL:g}")

    def exact(self, what: str, ours, ref) -> None:
        """Index lists, bit for bit; the table records how many entries differ."""
        if len(ours) != len(ref):
            self.misses.append(f"{what}: {len(ours)} scales, golden {len(ref)}")
        wrong = 0
        for si, (a, b) in enumerate(zip(ours, ref)):
            if a.shape != b.shape:
                self.misses.append(f"{what}[{si}]: shape {tuple(a.shape)}, golden {tuple(b.shape)}")
                continue
            n = int((a.long() != b.long()).sum())
            wrong += n
            if n:
                self.misses.append(f"{what}[{si}]: {n}/{b.numel()} entries differ")
        self.table[(self.file, what + " (# differ)")] = float(wrong)

    def finish(self) -> None:
        if self.misses:
            pytest.fail(f"{self.file}: {len(self.misses)} mismatches:\n  " + "\n  ".join(self.misses), pytrace=False)


def keyed_vqvae_state(golden: dict) -> dict:
    """The tiny VQVAE's weights from the README's rule: a generator seeded with crc32(key) per tensor."""
    state = {}
    for key, (_, _, shape) in golden["vqvae_key_checksums"].items():
        shape = tuple(shape)
        r = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8"))))
        module = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
        if key.endswith("ema_vocab_hit_SV"):
            value = torch.zeros(shape)
        elif module.startswith("norm"):
            value = 1 + 0.1 * r if key.endswith(".weight") else 0.1 * r
        elif key == "quantize.embedding.weight":
            value = 0.5 * r
        elif key.endswith(".weight"):
            value = r / (shape[1] * shape[2] * shape[3]) ** 0.5
        else:
            value = 0.02 * r
        state[key] = value
    return state


def golden_model(g: dict):
    cfg = g["config"]
    return load_mvar(g["state_dict"], drop_path_rate=cfg["drop_path_rate"])


@pytest.mark.parity("mvar")
def test_golden(golden_file: Path, max_diffs):
    assert golden_file.is_file(), f"no .pt golden files in {golden_file}"
    g = load_golden(golden_file)
    check = Check(golden_file.name, max_diffs)
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

    exported = export_mvar(gen)
    if set(exported) != set(g["state_dict"]):
        check.misses.append(f"export keys differ: {sorted(set(exported) ^ set(g['state_dict']))[:6]}")
    else:
        differ = [k for k, v in g["state_dict"].items() if not torch.equal(exported[k], v)]
        if differ:
            check.misses.append(f"export tensors differ: {differ[:6]}")

    vae_state = keyed_vqvae_state(g)
    for key, (total, abs_total, _) in g["vqvae_key_checksums"].items():
        v = vae_state[key].double()
        if abs(v.sum().item() - total) > 1e-6 * max(1.0, abs_total) or abs(v.abs().sum().item() - abs_total) > 1e-6 * max(1.0, abs_total):
            check.misses.append(f"regenerated VQVAE tensor {key} fails its checksum")
    for key, ref in g["vqvae_small_state"].items():
        if not torch.equal(vae_state[key], ref):
            check.misses.append(f"regenerated VQVAE tensor {key} differs from vqvae_small_state")
    vae = load_vae(vae_state, v_patch_nums=tuple(cfg["patch_nums"]))
    composition = ResidualComposition(vae)
    with torch.no_grad():
        check.exact("gt_idx_Bl (tokenizer)", vae.img_to_idx(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1),
                    g["gt_idx_Bl"])
        check.close("x_BLCv_wo_first_l (tokenizer)", composition.teacher_inputs(g["gt_idx_Bl"]), x)
        for name, run in g["samples"].items():
            check_sampling(gen.eval(), composition, run, check, f"sample {name}: ")
    check.finish()


def check_sampling(gen, composition, run: dict, check: Check, at: str) -> None:
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
