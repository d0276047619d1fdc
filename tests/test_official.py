"""Official VAR checkpoints: key tables against the real release key lists, the converter, `load_generator`.

The key lists (`<parity dir>/keys/*.txt`) were written by the official code; the golden state dicts
(`<parity dir>/var/*.pt`) are the official code's tiny random models (see that folder's README).
"""

import ast
import importlib
import json
from pathlib import Path

import pytest
import torch

from scalegen.io import CheckpointMismatch, read_meta, save_safetensors
from scalegen.official import export, load, recognise
from scalegen.official.var import build_var, var_config_from_state
from scalegen.pretrained import load_generator
from scalegen.schedule.scales import VAR_256, VAR_512
from scalegen.tokenizers import MultiScaleVQVAE

# the converter command (`python -m scalegen.official.convert`), called as the CLI is
convert_cli = importlib.import_module("scalegen.official.convert")


pytestmark = pytest.mark.threads(1)


def read_keys(path: Path) -> dict:
    """key -> (shape, dtype or None, 'param'/'buffer' or None) from a `key<TAB>shape[<TAB>dtype<TAB>kind]` list."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        shape = tuple(ast.literal_eval(cols[1]))
        out[cols[0]] = (shape, cols[2] if len(cols) > 2 else None, cols[3] if len(cols) > 3 else None)
    assert out, f"no keys in {path}"
    return out


def assert_matches_key_list(state: dict, keys: dict, what: str) -> None:
    missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
    assert not missing and not extra, f"{what}: missing {missing[:10]}, unexpected {extra[:10]}"
    shapes = [f"{k}: ours {tuple(state[k].shape)}, release {keys[k][0]}" for k in keys if tuple(state[k].shape) != keys[k][0]]
    assert not shapes, f"{what}: " + "; ".join(shapes[:10])
    dtypes = [f"{k}: ours {state[k].dtype}, release {d}" for k, (_, d, _) in keys.items()
              if d is not None and state[k].dtype != getattr(torch, d)]
    assert not dtypes, f"{what}: " + "; ".join(dtypes[:10])


def release_params(keys: dict) -> int:
    return sum(torch.Size(shape).numel() for shape, _, kind in keys.values() if kind == "param")


# ---- key tables against the release key lists ----------------------------------------------------------------------


VAR_D16 = dict(num_classes=1000, token_dim=32, scales=VAR_256, depth=16, width=1024, num_heads=16, shared_aln=False,
               attn_l2_norm=True, vocab_size=4096)
VAR_D36S = dict(VAR_D16, scales=VAR_512, depth=36, width=2304, num_heads=36, shared_aln=True)


@pytest.mark.parametrize("config, file", [(VAR_D16, "keys_var_d16.txt"), (VAR_D36S, "keys_var_d36_saln.txt")],
                         ids=["d16", "d36_saln"])
def test_export_var_matches_release_keys(config, file, parity_root):
    keys = read_keys(parity_root / "keys" / file)
    with torch.device("meta"):
        gen = build_var(config)
    state = export("var", gen)
    assert_matches_key_list(state, keys, file)
    if any(kind for _, _, kind in keys.values()):
        assert sum(p.numel() for p in gen.parameters()) == release_params(keys)
    # and the inferred config of a state dict with these shapes is the one we built
    inferred = var_config_from_state(state)
    assert {k: v for k, v in inferred.items() if k != "scales"} == {k: v for k, v in config.items() if k != "scales"}
    assert inferred["scales"] == tuple((s, s) for s in config["scales"])


def test_export_vae_matches_release_keys(parity_root):
    keys = read_keys(parity_root / "keys" / "keys_vae.txt")
    with torch.device("meta"):
        vae = MultiScaleVQVAE(ch=160)
    state = export("vae", vae)
    assert_matches_key_list(state, keys, "keys_vae.txt")
    assert sum(p.numel() for p in vae.parameters()) == release_params(keys) == 108_948_355


# ---- the converter command, round trip ------------------------------------------------------------------------------


def randomized_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and float buffer random, so a mis-mapped or dropped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and name in module.state_dict():
                t.copy_(torch.randn(t.shape, generator=g))
    return module


def small_release_var(shared_aln: bool = False) -> dict:
    """An official-layout VAR state dict at the released 256 px schedule, tiny width."""
    config = dict(num_classes=3, token_dim=4, scales=VAR_256, depth=2, width=32, num_heads=2, shared_aln=shared_aln,
                  attn_l2_norm=True, vocab_size=16)
    return export("var", randomized_(build_var(config), seed=1 + shared_aln))


def small_release_vae() -> dict:
    """An official-layout VQVAE state dict (10 scales, as released), tiny width: 32 px -> 16x16x4 latent."""
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    state = export("vae", randomized_(vae, seed=3))
    state["quantize.ema_vocab_hit_SV"] = torch.rand(10, 16)  # usage statistics travel too
    return state


def assert_same_tensors(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref), (sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref)))
    differ = [k for k in ref if not (ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
                                     and torch.equal(ours[k], ref[k]))]
    assert not differ, differ[:10]


def convert_and_back(kind: str, state: dict, tmp_path: Path) -> tuple[Path, dict]:
    src, st, back = tmp_path / f"{kind}.pth", tmp_path / f"{kind}.safetensors", tmp_path / f"{kind}_back.pth"
    torch.save(state, src)
    convert_cli.main([kind, str(src), "-o", str(st)])
    convert_cli.main([kind, str(st), "-o", str(back), "--to-official"])
    return st, torch.load(back, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("shared_aln", [False, True], ids=["aln", "saln"])
def test_convert_var_round_trip(shared_aln, tmp_path):
    state = small_release_var(shared_aln)
    st, back = convert_and_back("var", state, tmp_path)
    assert_same_tensors(back, state)
    meta = read_meta(str(st))
    assert meta["kind"] == "var" and meta["config"]["shared_aln"] is shared_aln and meta["config"]["depth"] == 2


def test_convert_vae_round_trip(tmp_path):
    state = small_release_vae()
    st, back = convert_and_back("vae", state, tmp_path)
    assert_same_tensors(back, state)
    assert read_meta(str(st))["kind"] == "vae"


def test_convert_refuses_the_wrong_kind(tmp_path):
    st, _ = convert_and_back("vae", small_release_vae(), tmp_path)
    with pytest.raises(ValueError, match="kind 'vae'"):
        convert_cli.main(["var", str(st), "-o", str(tmp_path / "x.pth"), "--to-official"])


def test_convert_missing_key_listed(tmp_path):
    state = small_release_var()
    del state["blocks.1.attn.proj.bias"]
    torch.save(state, tmp_path / "var.pth")
    with pytest.raises(CheckpointMismatch, match=r"missing \(1\): backbone\.blocks\.1\.attn\.proj\.bias"):
        convert_cli.main(["var", str(tmp_path / "var.pth"), "-o", str(tmp_path / "var.safetensors")])
    assert not (tmp_path / "var.safetensors").exists()


def test_convert_vae_missing_and_unknown_keys_listed(tmp_path):
    state = small_release_vae()
    del state["decoder.conv_out.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "vae.pth")
    with pytest.raises(CheckpointMismatch) as err:
        convert_cli.main(["vae", str(tmp_path / "vae.pth"), "-o", str(tmp_path / "vae.safetensors")])
    assert "decoder.conv_out.bias" in str(err.value) and "encoder.extra.weight" in str(err.value)


def test_golden_var_missing_key_listed(parity_root):
    golden = torch.load(parity_root / "var" / "var_tiny_aln.pt", map_location="cpu", weights_only=True)
    state = dict(golden["state_dict"])
    del state["head_nm.ada_lin.1.weight"]
    with pytest.raises(CheckpointMismatch, match=r"missing \(1\): head\.norm\.ada_lin\.1\.weight"):
        load("var", state, scales=golden["config"]["patch_nums"])
    state["blocks.0.attn.nonsense"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(1\): backbone\.blocks\.0\.attn\.nonsense"):
        load("var", state, scales=golden["config"]["patch_nums"])


# ---- load_generator + generate on the golden files ------------------------------------------------------------------


def write_converted_var(state: dict, scales, path: Path) -> Path:
    """What the converter writes (scalegen names, the architecture in the metadata), for a non-preset schedule."""
    config = var_config_from_state(state, scales=scales)
    gen = load("var", state, config)
    save_safetensors(gen.state_dict(), path, metadata={"kind": "var", "config": json.dumps(config)})
    return path


@pytest.mark.parametrize("name", ["var_tiny_aln.pt", "var_tiny_saln.pt"])
def test_golden_to_official_round_trip(name, parity_root, tmp_path):
    golden = torch.load(parity_root / "var" / name, map_location="cpu", weights_only=True)
    st = write_converted_var(golden["state_dict"], golden["config"]["patch_nums"], tmp_path / "var.safetensors")
    convert_cli.main(["var", str(st), "-o", str(tmp_path / "back.pth"), "--to-official"])
    assert_same_tensors(torch.load(tmp_path / "back.pth", weights_only=True), golden["state_dict"])


@pytest.mark.parametrize("name", ["var_tiny_aln.pt", "var_tiny_saln.pt"])
def test_load_generator_reproduces_golden_samples(name, parity_root, tmp_path):
    golden = torch.load(parity_root / "var" / name, map_location="cpu", weights_only=True)
    vae_golden = torch.load(parity_root / "var" / golden["vae_file"], map_location="cpu", weights_only=True)
    main = golden["samples"]["main"]
    assert main["call"] == dict(B=2, label_B=[3, 7], g_seed=42, cfg=1.5, top_k=5, top_p=0.9, more_smooth=False)
    torch.save(vae_golden["state_dict"], tmp_path / "vae.pth")
    st = write_converted_var(golden["state_dict"], golden["config"]["patch_nums"], tmp_path / "var.safetensors")

    module = load_generator(str(st), str(tmp_path / "vae.pth"))
    assert not module.training and module.num_classes == 10
    images = module.generate([3, 7], seed=42, cfg_scale=1.5, top_k=5, top_p=0.9)
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    # the module seeds a CPU generator with `seed`, as the official sampler does with g_seed
    torch.testing.assert_close(images, main["sample_img"], atol=1e-4, rtol=0)
    assert torch.equal(images, module.generate([3, 7], seed=42, cfg_scale=1.5, top_k=5, top_p=0.9))


def test_load_generator_from_release_layout_files(tmp_path):
    """Official-layout .pth files at the released schedule load without flags and sample."""
    torch.save(small_release_var(), tmp_path / "var.pth")
    torch.save(small_release_vae(), tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="vae_ckpt"):
        load_generator(str(tmp_path / "var.pth"))
    module = load_generator(str(tmp_path / "var.pth"), str(tmp_path / "vae.pth"))
    images = module.generate([0, 2], seed=0, cfg_scale=1.5, top_k=4)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    # the converted files give the same model
    convert_cli.main(["var", str(tmp_path / "var.pth"), "-o", str(tmp_path / "var.safetensors")])
    convert_cli.main(["vae", str(tmp_path / "vae.pth"), "-o", str(tmp_path / "vae.safetensors")])
    again = load_generator(str(tmp_path / "var.safetensors"), str(tmp_path / "vae.safetensors"))
    assert torch.equal(again.generate([0, 2], seed=0, cfg_scale=1.5, top_k=4), images)


def test_releases_are_recognised_by_their_keys_and_paired(tmp_path):
    torch.save(small_release_var(), tmp_path / "var.pth")
    torch.save({"model": small_release_vae()}, tmp_path / "vae.pth")
    assert recognise(tmp_path / "var.pth") == "var" and recognise(tmp_path / "vae.pth") == "vae"
    with pytest.raises(ValueError, match="tokenizer release"):
        load_generator(str(tmp_path / "vae.pth"), str(tmp_path / "vae.pth"))
    with pytest.raises(ValueError, match=r"vae_ckpt=.* is a VAR release"):
        load_generator(str(tmp_path / "var.pth"), str(tmp_path / "var.pth"))
    with pytest.raises(FileNotFoundError, match="tokenizer checkpoint not found"):
        load_generator(str(tmp_path / "var.pth"), str(tmp_path / "nowhere.pth"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no release's key table fits"):
        load_generator(str(tmp_path / "other.pth"), str(tmp_path / "vae.pth"))
