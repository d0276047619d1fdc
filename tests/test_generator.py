"""The generator: KV-cached generation = the teacher-forced forward, guidance, samplers, VAR's init, the presets."""

import pytest
import torch
from conftest import REPO, compose_cfg, tiny_vq

from scalegen.build import build_generator, build_tokenizer
from scalegen.checks import check_generator_config
from scalegen.generation.guidance import GuidancePolicy, guide
from scalegen.generation.loop import generate
from scalegen.generation.options import GenerateOptions
from scalegen.generators import AdaLNTransformer, Generator, init_var_weights
from scalegen.heads import CategoricalHead, sample_tokens, top_k_top_p_
from scalegen.schedule.residual import ResidualComposition
from scalegen.tokenizers import MultiScaleVQVAE

CONFIGS = REPO / "configs"
pytestmark = pytest.mark.threads(1)


def tiny_generator(scales=(1, 2, 3), token_dim=8, vocab=16, num_classes=5, shared_aln=False, attn_l2_norm=True):
    backbone = AdaLNTransformer(num_classes=num_classes, token_dim=token_dim, scales=scales, depth=2, width=64,
                                num_heads=2, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm)
    return Generator(backbone, CategoricalHead(64, 64, vocab)).eval()


# ---- (a) the KV cache gives the teacher-forced numbers --------------------------------------------------------------


@pytest.mark.parametrize("shared_aln", [False, True], ids=["aln", "saln"])
@pytest.mark.parametrize("attn_l2_norm", [False, True], ids=["dot", "l2"])
@torch.no_grad()
def test_kv_cache_equals_full_forward(shared_aln, attn_l2_norm):
    torch.manual_seed(0)
    gen = tiny_generator(shared_aln=shared_aln, attn_l2_norm=attn_l2_norm)
    bb = gen.backbone
    sched = bb.scales
    B, n0 = 3, sched.token_counts[0]
    labels = torch.tensor([0, 4, 5])  # 5 = the null class
    inputs = torch.randn(B, sched.num_tokens - n0, 8)

    full, cond_full = bb(labels, inputs)
    assert full.shape == (B, sched.num_tokens, 64)

    bb.kv_caching(True)
    try:
        x, cond = bb.start(labels)
        hidden = []
        for si, (begin, end) in enumerate(sched.offsets):
            hidden.append(bb.step(x, cond, si))
            if si + 1 < len(sched):
                nb, ne = sched.offsets[si + 1]
                x = bb.embed_scale(si + 1, inputs[:, nb - n0: ne - n0])
    finally:
        bb.kv_caching(False)
    stepped = torch.cat(hidden, dim=1)
    torch.testing.assert_close(cond, cond_full)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(gen.head(stepped, cond), gen.head(full, cond_full), atol=1e-5, rtol=0)
    # the cache is gone afterwards: a fresh full forward is unaffected
    assert all(b.attn.cached_k is None for b in bb.blocks)
    torch.testing.assert_close(bb(labels, inputs)[0], full)


# ---- (b) generation replays through the teacher-forced forward ------------------------------------------------------


def tiny_vae(scales=(1, 2, 4)) -> MultiScaleVQVAE:
    return tiny_vq(scales).eval()


def record_generation(gen, composition, labels, generator=None, **kw):
    seen = {"logits_cfg": [], "logits_masked": [], "idx": []}

    def inspect(si, name, t):
        seen[name].append(t.clone())  # the samplers mask logits in place: keep a copy

    latent = generate(gen.backbone, gen.head, composition, labels, GenerateOptions.of(gen.head, **kw), generator=generator,
                      inspect=inspect)
    return latent, seen


@torch.no_grad()
def test_generation_replays_through_teacher_forcing():
    torch.manual_seed(0)
    vae = tiny_vae()
    composition = ResidualComposition(vae)
    gen = tiny_generator(scales=composition.scales.sizes, token_dim=composition.token_dim, vocab=composition.vocab_size,
                         num_classes=4)
    labels = torch.tensor([0, 3, 1])
    rng = torch.Generator().manual_seed(1)
    latent, seen = record_generation(gen, composition, labels, cfg_scale=0.0, top_k=0, top_p=0.0, generator=rng)

    sched = composition.scales
    assert len(seen["idx"]) == len(sched)
    for idx, (h, w) in zip(seen["idx"], sched.sizes):
        assert idx.shape == (3, h * w) and idx.dtype == torch.long
        assert 0 <= idx.min() and idx.max() < composition.vocab_size

    logits = gen.head(*gen.backbone(labels, composition.teacher_inputs(seen["idx"])))  # t = 0: the conditional logits alone
    for si, (begin, end) in enumerate(sched.offsets):
        torch.testing.assert_close(seen["logits_cfg"][si], logits[:, begin:end], atol=1e-4, rtol=0)

    # the latent generation built is the one the quantizer composes from the same indices
    codes = [vae.quantize.embed(i, s) for i, s in zip(seen["idx"], sched.sizes)]
    torch.testing.assert_close(latent, vae.quantize.embed_to_fhat(codes, sched)[-1], atol=1e-5, rtol=0)
    image = composition.decode(latent)
    assert image.shape == (3, 3, 8, 8) and image.min() >= -1 and image.max() <= 1


@torch.no_grad()
def test_generation_guidance_mixes_conditional_and_null_passes():
    torch.manual_seed(1)
    vae = tiny_vae()
    composition = ResidualComposition(vae)
    gen = tiny_generator(scales=composition.scales.sizes, token_dim=composition.token_dim, vocab=composition.vocab_size,
                         num_classes=4)
    labels = torch.tensor([2, 0])
    cfg = 2.0
    _, seen = record_generation(gen, composition, labels, cfg_scale=cfg, generator=torch.Generator().manual_seed(3))
    inputs = composition.teacher_inputs(seen["idx"])
    cond = gen.head(*gen.backbone(labels, inputs))
    uncond = gen.head(*gen.backbone(torch.full_like(labels, 4), inputs))
    S = len(composition.scales)
    for si, (begin, end) in enumerate(composition.scales.offsets):
        t = cfg * si / (S - 1)  # the linear ramp
        expected = cond[:, begin:end] + t * (cond[:, begin:end] - uncond[:, begin:end])
        torch.testing.assert_close(seen["logits_cfg"][si], expected, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_generation_is_seeded():
    torch.manual_seed(0)
    composition = ResidualComposition(tiny_vae())
    gen = tiny_generator(scales=composition.scales.sizes, token_dim=8, vocab=32, num_classes=4)
    labels = torch.tensor([1, 2])
    run = lambda seed: record_generation(gen, composition, labels, cfg_scale=1.5, top_k=8, top_p=0.9,
                                         generator=torch.Generator().manual_seed(seed))
    (a, sa), (b, sb), (c, sc) = run(5), run(5), run(6)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa["idx"], sb["idx"]))
    assert not all(torch.equal(x, y) for x, y in zip(sa["idx"], sc["idx"]))


# ---- (c) classifier-free guidance ---------------------------------------------------------------------------------


def test_guide():
    torch.manual_seed(0)
    c, u = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    assert torch.equal(guide(c, u, 0.0), c)
    for t in (0.5, 1.5, 4.0):
        torch.testing.assert_close(guide(c, u, t), c + t * (c - u))
    torch.testing.assert_close(guide(c, c, 3.0), c)  # equal passes: no effect


def test_guidance_strength_schedules():
    def guidance_strength(cfg_scale, si, S, schedule):  # the weight at scale si of S (ratio si / (S-1))
        return GuidancePolicy(cfg_scale, schedule).at(si, S, (1, 1)).weight

    assert guidance_strength(1.5, 0, 2, "linear") == 0.0
    assert guidance_strength(1.5, 1, 2, "linear") == 1.5
    assert guidance_strength(2.0, 1, 5, "linear") == pytest.approx(0.5)
    assert guidance_strength(1.5, 0, 2, "constant") == guidance_strength(1.5, 7, 11, "constant") == 1.5
    with pytest.raises(ValueError, match="cosine"):
        guidance_strength(1.5, 1, 3, "cosine")


# ---- (d) samplers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_keeps_exactly_k(k):
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 50)
    out = top_k_top_p_(logits.clone(), top_k=k)
    finite = torch.isfinite(out)
    assert (finite.sum(-1) == k).all()
    kept_min = torch.where(finite, logits, torch.inf).amin(-1)
    dropped_max = torch.where(finite, -torch.inf, logits).amax(-1)
    assert (kept_min > dropped_max).all()  # the k largest
    assert torch.equal(out[finite], logits[finite])  # untouched values


def test_top_k_masks_in_place_and_zero_is_off():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 20)
    same = top_k_top_p_(logits, top_k=4)
    assert same is logits and (torch.isfinite(logits).sum(-1) == 4).all()
    x = torch.randn(2, 3, 20)
    assert torch.equal(top_k_top_p_(x.clone(), 0, 0.0), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.95])
def test_top_p_keeps_smallest_set_reaching_p(p):
    torch.manual_seed(1)
    logits = torch.randn(8, 5, 30) * 2
    out = top_k_top_p_(logits.clone(), top_p=p)
    probs = logits.double().softmax(-1).view(-1, 30)
    kept = torch.isfinite(out).view(-1, 30)
    for row in range(probs.shape[0]):
        order = probs[row].argsort(descending=True)
        mass, expected = 0.0, set()
        for j in order.tolist():  # brute force: add tokens from the most likely until the mass reaches p
            expected.add(j)
            mass += probs[row, j].item()
            if mass >= p:
                break
        assert set(kept[row].nonzero().view(-1).tolist()) == expected, row


def test_most_likely_token_always_kept():
    torch.manual_seed(2)
    logits = torch.randn(6, 4, 40)
    logits[0, 0, 7] = 20.0  # one token with almost all the mass
    top = logits.argmax(-1, keepdim=True)
    for k, p in ((1, 0.0), (0, 1e-6), (0, 0.01), (2, 0.001), (5, 0.5)):
        out = top_k_top_p_(logits.clone(), top_k=k, top_p=p)
        assert torch.isfinite(out.gather(-1, top)).all(), (k, p)
    assert (torch.isfinite(top_k_top_p_(logits.clone(), top_p=0.5)[0, 0]).sum()) == 1


def test_top_k_then_top_p():
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 25)
    both = top_k_top_p_(logits.clone(), top_k=6, top_p=0.7)
    k_only = top_k_top_p_(logits.clone(), top_k=6)
    # top-p works on the renormalised top-k distribution: the same as applying it to the top-k masked logits
    assert torch.equal(both, top_k_top_p_(k_only.clone(), top_p=0.7))
    assert (torch.isfinite(both).sum(-1) <= 6).all() and (torch.isfinite(both).sum(-1) >= 1).all()


def test_sample_tokens_seeded_and_only_unmasked():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 64)
    a = sample_tokens(logits.clone(), 5, 0.8, torch.Generator().manual_seed(0))
    b = sample_tokens(logits.clone(), 5, 0.8, torch.Generator().manual_seed(0))
    assert a.shape == (4, 9) and a.dtype == torch.long and torch.equal(a, b)
    masked = top_k_top_p_(logits.clone(), 5, 0.8)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        idx = sample_tokens(logits.clone(), 5, 0.8, g)
        assert torch.isfinite(masked.gather(-1, idx.unsqueeze(-1))).all()
    work = logits.clone()
    sample_tokens(work, 5, 0.8, g)
    assert torch.equal(work, masked)  # the logits are masked in place (the Gumbel path reads them)


def test_sample_tokens_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1, 0.0])).view(1, 1, 4).expand(1, 4000, 4).contiguous()
    idx = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx.view(-1), minlength=4).float() / idx.numel()
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


# ---- (e) VAR's initialisation -------------------------------------------------------------------------------------


@torch.no_grad()
def test_init_var_weights_gates_small_and_blocks_near_identity():
    torch.manual_seed(0)
    gen = tiny_generator()
    width, gamma = 64, 1e-5
    init_var_weights(gen, init_adaln=0.5, init_adaln_gamma=gamma, init_head=0.02)
    std = (1 / width / 3) ** 0.5
    for block in gen.backbone.blocks:
        w = block.ada_lin[-1].weight
        gates, mods = w[: 2 * width], w[2 * width:]
        assert 0 < gates.abs().max() <= 2 * gamma  # trunc-normal at +-2 times 1e-5
        assert gates.std() == pytest.approx(gamma * std, rel=0.1)
        assert mods.std() == pytest.approx(0.5 * std, rel=0.1)
        assert torch.count_nonzero(block.ada_lin[-1].bias) == 0
    assert gen.head.proj.weight.std() == pytest.approx(0.02 * std, rel=0.1)
    assert torch.count_nonzero(gen.head.proj.bias) == 0

    x = torch.randn(2, gen.backbone.scales.num_tokens, width)
    cond = gen.backbone.class_emb(torch.tensor([1, 5]))
    for block in gen.backbone.blocks:
        out = block(x, cond, gen.backbone.attention_bias(gen.backbone.scales))
        assert (out - x).abs().max() < 1e-4 * x.abs().max()
    # so the whole stack returns (nearly) its embedded input
    bb, labels = gen.backbone, torch.tensor([1, 5])
    inputs = torch.randn(2, bb.scales.num_tokens - 1, 8)
    start, _ = bb.start(labels)
    embedded = torch.cat([start] + [bb.embed_scale(si, inputs[:, b - 1: e - 1])
                                    for si, (b, e) in enumerate(bb.scales.offsets) if si > 0], dim=1)
    hidden, _ = bb(labels, inputs)
    assert (hidden - embedded).abs().max() < 1e-4 * embedded.abs().max()


@torch.no_grad()
def test_init_var_weights_shared_aln_scales_ada_gss():
    torch.manual_seed(0)
    gen = tiny_generator(shared_aln=True)
    before = [b.ada_gss.clone() for b in gen.backbone.blocks]
    init_var_weights(gen, init_adaln=0.5, init_adaln_gamma=1e-5)
    for block, old in zip(gen.backbone.blocks, before):
        torch.testing.assert_close(block.ada_gss[:, :, :2], old[:, :, :2] * 1e-5)
        torch.testing.assert_close(block.ada_gss[:, :, 2:], old[:, :, 2:] * 0.5)
        assert block.ada_gss[:, :, :2].abs().max() < 1e-5


# ---- (f) the paper presets ----------------------------------------------------------------------------------------

OFFICIAL_PARAMS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356, 36: 2_353_893_904}
VAE_PARAMS = 108_948_355


@pytest.mark.parametrize("depth", sorted(OFFICIAL_PARAMS))
def test_var_presets_match_official_parameter_counts(depth):
    cfg = compose_cfg(f"experiment=var_d{depth}", "data.root=/x")
    check_generator_config(cfg)
    with torch.device("meta"):
        tok = build_tokenizer(cfg)
        gen, comp = build_generator(cfg, tok, 1000)
    assert sum(p.numel() for p in gen.parameters()) == OFFICIAL_PARAMS[depth]
    assert sum(p.numel() for p in tok.parameters()) == VAE_PARAMS
    bb = gen.backbone
    assert bb.depth == depth and bb.width == 64 * depth and bb.blocks[0].attn.num_heads == depth
    assert bb.scales.num_tokens == (2240 if depth == 36 else 680)
    assert comp.vocab_size == 4096 and comp.token_dim == 32


EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_experiments_found():
    assert {f"var_d{d}" for d in OFFICIAL_PARAMS} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_checks(name):
    cfg = compose_cfg(f"experiment={name}", "++data.root=/x")  # ++: experiment=compare keeps the digits (no root)
    check_generator_config(cfg)
