"""The teacher-forced attention paths (attention=auto|dense|flex) against the dense mask: forward and gradients in fp32
on CPU, for every backbone and four kinds of schedule; the BlockMask's pattern; no mask in KV-cached generation;
which path `auto` picks; the config refusals."""

import logging

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
import torch.nn.functional as F
from conftest import compose_cfg

from scalegen.build import build_generator, build_tokenizer
from scalegen.checks import check_generator_config
from scalegen.errors import ConfigError
from scalegen.generators import attention as attention_module
from scalegen.generators.attention import WithinSegments, flex_unavailable, sequence_mask
from scalegen.generators.backbone import AdaLNTransformer
from scalegen.generators.flexvar import ScaleFreeTransformer
from scalegen.generators.flowar import FlowARTransformer
from scalegen.generators.mvar import MambaAdaLNTransformer
from scalegen.schedule.scales import VAR_256, ScaleSchedule, doubling

pytestmark = [pytest.mark.threads(1),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

SCHEDULES = {
    "var10": VAR_256,  # VAR's 10 scales, 680 tokens
    "doubling": doubling(16),
    "nonsquare": [(1, 1), (1, 2), (2, 3), (3, 4), (4, 6)],
    "anystep": (1, 2, 4, 4, 7, 11),  # an any-step list; the repeated size is packed into one call within scales
}
SMALL = dict(num_classes=5, token_dim=8, depth=2, width=32, num_heads=2)
BACKBONES = {
    "var": lambda s: AdaLNTransformer(scales=s, drop_path_rate=0.0, **SMALL),
    "flexvar": lambda s: ScaleFreeTransformer(scales=s, drop_path_rate=0.0, pos_grid=16, **SMALL),
    "flowar": lambda s: FlowARTransformer(scales=s, **SMALL),
    "mvar": lambda s: MambaAdaLNTransformer(scales=s, drop_path_rate=0.0, d_state=16, headdim=32, mamba_backend="torch",
                                            **SMALL),
}
# the paths that must equal the dense one: flex everywhere; auto is M-VAR's per-scale attention (dense elsewhere on CPU)
FAST = {"var": ["flex"], "flexvar": ["flex"], "flowar": ["flex"], "mvar": ["auto", "flex"]}


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch refuses CPU inputs that require grad before its reference implementation, which does differentiate; lifted
    here so that our BlockMask and wiring are checked under gradients (the CUDA kernels are torch's own)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda q, k, v: None)


def backbone(name: str, sizes):
    torch.manual_seed(0)
    bb = BACKBONES[name](sizes)
    with torch.no_grad():  # off the init, so every branch (and the attention of every block) matters
        for p in bb.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return bb.train()


def forward_and_grads(bb, labels, inputs, weights, sched):
    inputs = inputs.clone().requires_grad_(True)
    hidden, _ = bb(labels, inputs, sched)
    params = [p for p in bb.parameters()]
    grads = torch.autograd.grad((hidden * weights).sum(), params + [inputs], allow_unused=True)
    return hidden.detach(), grads


def assert_within(ours: torch.Tensor, dense: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """max |ours - dense| <= tol x the tensor's scale (max |dense|, at least 1): fp32 sums taken in another order
    move a gradient that adds up hundreds of tokens by ~1e-6 of its largest entry."""
    scale = max(dense.abs().max().item(), 1.0)
    diff = (ours - dense).abs().max().item()
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(BACKBONES))
def test_fast_paths_equal_the_dense_mask(name, schedule, flex_backward_on_cpu, monkeypatch):
    sched = ScaleSchedule.of(SCHEDULES[schedule])
    bb = backbone(name, sched.sizes)
    labels = torch.tensor([0, 3])
    inputs = torch.randn(2, sched.num_tokens - sched.token_counts[0], 8)
    weights = torch.randn(2, sched.num_tokens, 32)

    bb.attention = "dense"
    hidden, grads = forward_and_grads(bb, labels, inputs, weights, sched)
    for path in FAST[name]:
        bb.attention = path
        fast_hidden, fast_grads = forward_and_grads(bb, labels, inputs, weights, sched)
        assert_within(fast_hidden, hidden, f"{path}: the hidden states")
        for i, (fast, dense) in enumerate(zip(fast_grads, grads)):
            assert (fast is None) == (dense is None)
            if dense is not None:
                assert_within(fast, dense, f"{path}: gradient {i}")

    # the agreement means something: without any mask the same model computes something else
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None, **kw: unmasked_sdpa(q, k, v, **kw))
    bb.attention = "dense"
    assert (bb(labels, inputs, sched)[0].detach() - hidden).abs().max() > 1e-2


_SDPA = F.scaled_dot_product_attention


def unmasked_sdpa(q, k, v, **kw):
    return _SDPA(q, k, v, **kw)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("kind", ["block_causal", "block_diagonal"])
def test_block_mask_allows_exactly_what_the_dense_bias_allows(schedule, kind):
    sched = ScaleSchedule.of(SCHEDULES[schedule])
    bm = sched.block_mask(kind)
    L = sched.num_tokens
    allowed = flex_module.create_mask(bm.mask_mod, 1, 1, L, L, device="cpu")[0, 0]
    assert torch.equal(allowed, sched.bias(kind) == 0)
    assert sched.block_mask(kind) is bm  # built once per (schedule, kind, device)
    pad = -L % 128  # the blocks the kernels visit: exactly those holding an allowed pair
    nb = (L + pad) // 128
    visited = F.pad(allowed, (0, pad, 0, pad)).view(nb, 128, nb, 128).any(3).any(1)
    assert torch.equal(bm.to_dense()[0, 0].bool(), visited)


@pytest.mark.parametrize("name", list(BACKBONES))
@torch.no_grad()
def test_kv_cached_steps_pass_no_mask(name, monkeypatch):
    sched = ScaleSchedule.of((1, 2, 3))
    bb = backbone(name, sched.sizes).eval()
    masks = []

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return _SDPA(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    bb.kv_caching(True)
    try:
        x, cond = bb.start(torch.tensor([1]), sched)
        for si in range(len(sched)):
            bb.step(x, cond, si, sched)
            if si + 1 < len(sched):
                x = bb.embed_scale(si + 1, torch.randn(1, sched.token_counts[si + 1], 8), sched)
    finally:
        bb.kv_caching(False)
    assert masks and all(m is None for m in masks)


def test_auto_picks_per_scale_within_scales_and_dense_on_cpu_saying_why_once(caplog, monkeypatch):
    sched = ScaleSchedule.of((1, 2, 4))
    monkeypatch.setattr(attention_module, "_LOGGED", set())
    cpu = torch.device("cpu")
    assert sequence_mask(sched, "block_diagonal", "auto", cpu) == WithinSegments((1, 4, 16))
    with caplog.at_level(logging.INFO, logger="scalegen.generators.attention"):
        for _ in range(2):
            assert torch.equal(sequence_mask(sched, "block_causal", "auto", cpu), sched.block_causal_bias())
    said = [r.getMessage() for r in caplog.records if "dense path" in r.getMessage()]
    assert len(said) == 1 and "no backward on cpu" in said[0]
    assert torch.equal(sequence_mask(sched, "block_diagonal", "dense", cpu), sched.block_diagonal_bias())
    assert sequence_mask(sched, "block_causal", "flex", cpu) is sched.block_mask("block_causal")
    # a prefix of the schedule: the dense mask, sliced
    assert torch.equal(sequence_mask(sched, "block_causal", "flex", cpu, length=5), sched.block_causal_bias()[:5, :5])
    # where FlexAttention runs (CUDA), auto takes it unless attention dropout is on
    monkeypatch.setattr(attention_module, "flex_unavailable", lambda device_type, dropout=0.0: "x" if dropout else None)
    assert sequence_mask(sched, "block_causal", "auto", cpu) is sched.block_mask("block_causal")
    assert isinstance(sequence_mask(sched, "block_causal", "auto", cpu, dropout=0.1), torch.Tensor)


def test_flex_refusals_at_run_time():
    sched = ScaleSchedule.of((1, 2))
    with pytest.raises(ValueError, match="no attention dropout.*attention=dense"):
        sequence_mask(sched, "block_causal", "flex", "cpu", dropout=0.1)
    with pytest.raises(ValueError, match="attention='sparse'.*auto \\| dense \\| flex"):
        AdaLNTransformer(scales=(1, 2), attention="sparse", **SMALL)
    assert "dropout" in flex_unavailable("cuda", 0.1)
    assert "no backward on cpu" in flex_unavailable("cpu")


def test_config_checks_attention_before_building():
    with pytest.raises(ConfigError, match=r"^attention: 'sparse' is not one of auto \| dense \| flex"):
        check_generator_config(compose_cfg("attention=sparse"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^attention=flex: .*no backward on cpu.*use attention=dense"):
            check_generator_config(compose_cfg("attention=flex"))
        with pytest.raises(ConfigError, match=r"^attention=flex: no CUDA device is visible.*use attention=dense"):
            check_generator_config(compose_cfg("attention=flex", "trainer=gpu"))
    with pytest.raises(ConfigError, match=r"^attention=flex: .*no attention dropout.*attn_drop_rate=0.1.*attention=dense"):
        check_generator_config(compose_cfg("model=flowar", "attention=flex", "backbone.attn_drop_rate=0.1"))
    with pytest.raises(ConfigError, match=r"^backbone\.attention: is derived from .*the run \(attention\)"):
        check_generator_config(compose_cfg("+backbone.attention=dense"))


@pytest.mark.parametrize("model", ["var", "mvar", "flowar"])
def test_the_run_key_reaches_the_backbone(model):
    cfg = compose_cfg(f"model={model}", "attention=dense")
    check_generator_config(cfg)
    generator, _ = build_generator(cfg, build_tokenizer(cfg), 10)
    assert generator.backbone.attention == "dense"
