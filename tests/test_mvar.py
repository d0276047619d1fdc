"""The M-VAR backbone: state-cached generation = the full forward, attention within scales, train = eval, any
scale size, shared AdaLN, the presets' parameter counts, the release key list, the converter, load_generator."""

import ast
import importlib
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from parity import keyed_vae_state

from scalegen.build import build_generator, build_tokenizer
from scalegen.checks import check_generator_config
from scalegen.generators import Generator, MambaAdaLNTransformer
from scalegen.heads import CategoricalHead
from scalegen.io import CheckpointMismatch, read_meta
from scalegen.official import export
from scalegen.official.mvar import build_mvar, mvar_config_from_state
from scalegen.pretrained import load_generator
from scalegen.schedule.scales import ScaleSchedule

convert_cli = importlib.import_module("scalegen.official.convert")
pytestmark = pytest.mark.threads(1)


def tiny_mvar(scales=(1, 2, 3), shared_aln=False, attn_l2_norm=False, seed=0, token_dim=8, vocab=16) -> Generator:
    torch.manual_seed(seed)
    backbone = MambaAdaLNTransformer(num_classes=5, token_dim=token_dim, scales=scales, depth=2, width=64, num_heads=2,
                                     drop_path_rate=0.0, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm, d_state=16,
                                     headdim=32, mamba_backend="torch")
    gen = Generator(backbone, CategoricalHead(64, 64, vocab))
    with torch.no_grad():  # every parameter off its init, so each branch (and each AdaLN chunk) matters
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return gen.eval()


def run_cached(bb, labels, inputs, record=None, scales=None):
    """Scale by scale through start / step / embed_scale with the cache on; hidden states concatenated."""
    sched = bb.resolve_scales(scales)
    n0 = sched.token_counts[0]
    bb.kv_caching(True)
    try:
        x, cond = bb.start(labels, sched)
        hidden = []
        for si, (begin, end) in enumerate(sched.offsets):
            hidden.append(bb.step(x, cond, si, sched))
            if record is not None:
                record.append([None if s is None else s.ssm.clone() for s in bb.cache_states()])
            if si + 1 < len(sched):
                nb, ne = sched.offsets[si + 1]
                x = bb.embed_scale(si + 1, inputs[:, nb - n0:ne - n0], sched)
    finally:
        bb.kv_caching(False)
    return torch.cat(hidden, 1)


@pytest.mark.parametrize("shared_aln", [False, True], ids=["aln", "saln"])
@pytest.mark.parametrize("attn_l2_norm", [False, True], ids=["dot", "l2"])
@torch.no_grad()
def test_state_cache_equals_full_forward(shared_aln, attn_l2_norm, monkeypatch):
    gen = tiny_mvar(shared_aln=shared_aln, attn_l2_norm=attn_l2_norm)
    bb = gen.backbone
    labels = torch.tensor([0, 4, 5])  # 5 = the null class
    inputs = torch.randn(3, bb.scales.num_tokens - 1, 8)
    full, _ = bb(labels, inputs)

    fed = []  # tokens each block's Mamba2 sees per call: one scale, never the prefix again
    for block in bb.blocks:
        step = block.mamba.step
        monkeypatch.setattr(block.mamba, "step", lambda u, s, step=step: (fed.append(u.shape[1]), step(u, s))[1])
    states = []
    cached = run_cached(bb, labels, inputs, states)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=2e-6)
    assert fed == [n for n in bb.scales.token_counts for _ in bb.blocks]
    assert all(s is not None for s in states[0]) and not torch.equal(states[0][0], states[1][0])  # the state moves on
    assert all(b.state is None and not b.caching for b in bb.blocks)  # caching off again, nothing held


@torch.no_grad()
def test_eval_mode_forward_equals_train_mode():
    """The official eval-mode teacher-forced forward crashes (no `cache`) or attends across scales; ours does not."""
    gen = tiny_mvar()
    labels, inputs = torch.tensor([1, 3]), torch.randn(2, 13, 8)
    evaluated = gen.head(*gen.backbone(labels, inputs))
    gen.train()
    torch.testing.assert_close(gen.head(*gen.backbone(labels, inputs)), evaluated, rtol=0, atol=0)


@torch.no_grad()
def test_any_scale_size_no_max_seqlen():
    """Scales above 16x16 (the official hard-coded max_seqlen=256 breaks 512 px) and non-square ones."""
    gen = tiny_mvar(scales=((1, 1), (2, 3), (5, 5), (18, 17)))
    bb = gen.backbone
    labels, inputs = torch.tensor([2]), torch.randn(1, bb.scales.num_tokens - 1, 8)
    full, _ = bb(labels, inputs)
    assert full.shape == (1, 1 + 6 + 25 + 306, 64) and full.isfinite().all()
    torch.testing.assert_close(run_cached(bb, labels, inputs), full, rtol=1e-5, atol=3e-6)


@torch.no_grad()
def test_attention_within_scales_mamba_causal_across():
    gen = tiny_mvar(scales=(1, 2, 3, 4))
    bb = gen.backbone
    assert torch.equal(bb.attention_bias(bb.scales), bb.scales.block_diagonal_bias())
    labels, inputs = torch.tensor([1]), torch.randn(1, 29, 8)
    base, _ = bb(labels, inputs)
    (b2, e2) = bb.scales.offsets[2]  # scale 2 (3x3) occupies [5, 14) of the sequence; inputs start after token 0
    changed = inputs.clone()
    changed[:, e2 - 2] += 1.0  # the last token of scale 2
    out, _ = bb(labels, changed)
    moved = (out - base).abs().amax(-1)[0]
    assert moved[:b2].max() == 0  # coarser scales never see it
    assert (moved[b2:e2] > 1e-4).all()  # every token of its own scale does (bidirectional attention), even raster-earlier
    assert (moved[e2:] > 1e-4).all()  # finer scales through Mamba2 (and their inputs' attention)


def test_shared_aln_builds_nine_chunks():
    gen = tiny_mvar(shared_aln=True)
    bb = gen.backbone
    assert bb.shared_ada_lin[1].out_features == 9 * 64 and bb.blocks[0].ada_gss.shape == (1, 1, 9, 64)
    assert bb.block_cond(torch.randn(2, 64)).shape == (2, 1, 9, 64)


def test_backward_reaches_every_parameter():
    gen = tiny_mvar().train()
    logits = gen.head(*gen.backbone(torch.tensor([0, 1]), torch.randn(2, 13, 8)))
    logits.square().mean().backward()
    missing = [n for n, p in gen.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# ---- presets and the release ----------------------------------------------------------------------------------------

OFFICIAL_PARAMS = {12: 198_435_424, 16: 464_157_184, 20: 900_528_736, 24: 1_550_067_136, 30: 3_017_065_756,
                   32: 3_658_707_968}


@pytest.mark.parametrize("depth", sorted(OFFICIAL_PARAMS))
def test_mvar_presets_match_official_parameter_counts(depth):
    cfg = compose_cfg(f"experiment=mvar_d{depth}", "data.root=/x")
    check_generator_config(cfg)
    with torch.device("meta"):
        gen, comp = build_generator(cfg, build_tokenizer(cfg), 1000)
    assert sum(p.numel() for p in gen.parameters()) == OFFICIAL_PARAMS[depth]
    bb = gen.backbone
    assert isinstance(bb, MambaAdaLNTransformer) and bb.width == 64 * depth and bb.blocks[0].attn.num_heads == depth
    assert bb.blocks[0].attn.attn_l2_norm is (depth >= 24)
    assert bb.blocks[0].mamba.nheads == 2 * depth and bb.scales.num_tokens == 680


def read_keys(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            cols = line.split("\t")
            out[cols[0]] = (tuple(ast.literal_eval(cols[1])), cols[2], cols[3])
    return out


D16 = dict(num_classes=1000, token_dim=32, scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), depth=16, width=1024, num_heads=16,
           shared_aln=False, attn_l2_norm=False, vocab_size=4096, d_state=64, d_conv=4, expand=2, headdim=64)


def test_export_matches_the_release_key_list(parity_root):
    keys = read_keys(parity_root / "keys" / "keys_mvar_d16.txt")
    with torch.device("meta"):
        gen = build_mvar(D16)
    state = export("mvar", gen)
    assert sorted(state) == sorted(keys)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: v[0] for k, v in keys.items()}
    assert {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()} == {k: v[1] for k, v in keys.items()}
    assert sum(p.numel() for p in gen.parameters()) == sum(math.prod(s) for s, _, kind in keys.values() if kind == "param")
    inferred = mvar_config_from_state(state)
    assert inferred == {**D16, "scales": tuple((s, s) for s in D16["scales"])}


@pytest.mark.parametrize("depth, l2", [(30, False), (2, True)])
def test_attn_l2_norm_is_read_from_the_keys_not_the_depth(depth, l2):
    with torch.device("meta"):
        gen = build_mvar({**D16, "depth": depth, "width": 64, "num_heads": 2, "attn_l2_norm": l2})
    state = export("mvar", gen)
    assert mvar_config_from_state(state)["attn_l2_norm"] is l2


@pytest.fixture(scope="module")
def golden_nol2(parity_root):
    path = parity_root / "mvar" / "mvar_tiny_nol2.pt"
    if not path.is_file():
        pytest.skip(f"no golden file {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def test_convert_round_trip_and_load_generator_reproduce_the_official_sampler(golden_nol2, tmp_path):
    g = golden_nol2
    torch.save(g["state_dict"], tmp_path / "d_tiny.pth")
    torch.save(keyed_vae_state(g), tmp_path / "vae.pth")
    convert_cli.main(["mvar", str(tmp_path / "d_tiny.pth"), "-o", str(tmp_path / "m.safetensors")])
    assert read_meta(str(tmp_path / "m.safetensors"))["kind"] == "mvar"
    convert_cli.main(["mvar", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "back.pth"), "--to-official"])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert sorted(back) == sorted(g["state_dict"]) and all(torch.equal(back[k], v) for k, v in g["state_dict"].items())

    run = g["samples"]["default"]
    call = run["call"]
    for ckpt in ("d_tiny.pth", "m.safetensors"):
        module = load_generator(str(tmp_path / ckpt), str(tmp_path / "vae.pth"))
        assert isinstance(module.generator.backbone, MambaAdaLNTransformer)
        images = module.generate(call["label_B"], seed=call["g_seed"], cfg_scale=call["cfg"], top_k=call["top_k"], top_p=call["top_p"])
        torch.testing.assert_close(images, run["img_B3HW"], atol=1e-4, rtol=0)


def test_wrong_kind_is_refused_with_the_keys(golden_nol2, tmp_path):
    torch.save(golden_nol2["state_dict"], tmp_path / "m.pth")
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(\d+\): .*mamba"):
        convert_cli.main(["var", str(tmp_path / "m.pth"), "-o", str(tmp_path / "x.safetensors")])
    var_like = {k: v for k, v in golden_nol2["state_dict"].items() if ".mamba." not in k}
    with pytest.raises(ValueError, match="not an M-VAR checkpoint"):
        mvar_config_from_state(var_like)



@torch.no_grad()
def test_scale_free_variant_caches_exactly_on_any_schedule():
    """backbone=mvar_flex (FlexVAR's positions on these blocks): the state cache holds on any schedule too."""
    from scalegen.generators.mvar import ScaleFreeMambaTransformer
    torch.manual_seed(0)
    bb = ScaleFreeMambaTransformer(num_classes=5, token_dim=8, scales=(1, 2, 4), depth=2, width=64, num_heads=2,
                                   drop_path_rate=0.0, d_state=16, headdim=32, pos_grid=8).eval()
    sched = ScaleSchedule.of([1, 3, 5, 7])
    assert torch.equal(bb.attention_bias(sched), sched.block_diagonal_bias())
    labels, inputs = torch.tensor([1, 5]), torch.randn(2, 9 + 25 + 49, 8)
    full, _ = bb(labels, inputs, sched)
    torch.testing.assert_close(run_cached(bb, labels, inputs, scales=sched), full, rtol=1e-5, atol=2e-6)
