"""Our Mamba2: the chunked scan against a token-by-token float64 recurrence, the carried state, mamba_ssm's
parameter layout (the released M-VAR-d16 key list), and the CPU path that never imports mamba-ssm."""

import importlib.abc
import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from scalegen.generators import mamba2 as mamba2_module
from scalegen.generators.mamba2 import Mamba2, ssd_scan
from scalegen.generators.mamba_ops import CausalConvSiLU, GatedRMSNormFn

pytestmark = pytest.mark.threads(1)


def recurrence(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, one token at a time in float64."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    Bh, Ch = B.double().repeat_interleave(h // g, dim=2), C.double().repeat_interleave(h // g, dim=2)
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t].double() * A.double())[..., None, None]
        state = state * decay + dt[:, t].double()[..., None, None] * x[:, t].double()[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, 1), state


def reference_mixer(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """mamba_ssm.Mamba2's maths written out plainly: in_proj, causal conv, SiLU, recurrence, gated RMSNorm, out_proj."""
    z, xBC, dt = m.in_proj(u).split([m.d_inner, m.conv_dim, m.nheads], -1)
    xBC = F.silu(m.conv1d(xBC.transpose(1, 2))[..., : u.shape[1]].transpose(1, 2))  # padding d_conv-1, cut the tail
    x, B, C = xBC.split([m.d_inner, m.d_state * m.ngroups, m.d_state * m.ngroups], -1)
    b, l, _ = u.shape
    x = x.reshape(b, l, m.nheads, m.headdim)
    y, _ = recurrence(x, F.softplus(dt + m.dt_bias), -torch.exp(m.A_log), B.reshape(b, l, m.ngroups, -1),
                      C.reshape(b, l, m.ngroups, -1))
    y = (y + x.double() * m.D.double()[:, None]).reshape(b, l, -1) * F.silu(z.double())
    groups = y.view(b, l, m.ngroups, -1)  # mamba-ssm normalises each group of d_inner / ngroups channels
    y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + 1e-5)).view(b, l, -1) * m.norm.weight.double()
    return m.out_proj(y.to(u.dtype))


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_scan_equals_the_recurrence(chunk, groups):
    torch.manual_seed(chunk + groups)
    b, l, h, p, n = 2, 37, 4, 8, 16
    x, B, C = torch.randn(b, l, h, p), torch.randn(b, l, groups, n), torch.randn(b, l, groups, n)
    dt, A = torch.rand(b, l, h) * 0.5, -torch.rand(h) * 4 - 0.5  # decays up to exp(-2.25) per token
    h0 = torch.randn(b, h, p, n)
    for init in (None, h0):
        y, state = ssd_scan(x, dt, A, B, C, chunk, init)
        y_ref, state_ref = recurrence(x, dt, A, B, C, init)
        scale = y_ref.abs().max().item()
        assert (y.double() - y_ref).abs().max() < 1e-6 * max(scale, 1.0)
        assert (state.double() - state_ref).abs().max() < 1e-6 * max(state_ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("initial", [False, True])
def test_chunked_scan_gradients_equal_the_recurrence(groups, initial):
    # the scan's backward is written out (chunk by chunk, last to first); every input's gradient, the initial
    # state's included, through both outputs, over chunks that do not divide the length
    torch.manual_seed(groups + 2 * initial)
    b, l, h, p, n = 2, 21, 4, 4, 8
    leaves = [torch.randn(b, l, h, p), torch.rand(b, l, h) * 0.3 + 0.01, -torch.rand(h) - 0.5,
              torch.randn(b, l, groups, n), torch.randn(b, l, groups, n)]
    leaves += [torch.randn(b, h, p, n)] if initial else []
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.double().requires_grad_() for t in leaves]
    wy, ws = torch.randn(b, l, h, p), torch.randn(b, h, p, n)
    y, s = ssd_scan(*ours[:5], 8, *ours[5:])
    ((y * wy).sum() + (s * ws).sum()).backward()
    y_ref, s_ref = recurrence(*ref)
    ((y_ref * wy.double()).sum() + (s_ref * ws.double()).sum()).backward()
    for a, r in zip(ours, ref):
        assert a.grad.isfinite().all()
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-5 * r.grad.abs().max().item())


def small_mixer(seed=0, **kw):
    torch.manual_seed(seed)
    m = Mamba2(64, **{"d_state": 16, "headdim": 16, **kw})
    with torch.no_grad():  # move every parameter off its init so each one matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("ngroups", [1, 2])
@torch.no_grad()
def test_mixer_equals_the_written_out_maths(ngroups):
    m = small_mixer(ngroups=ngroups)
    u = torch.randn(2, 29, 64)
    torch.testing.assert_close(m(u), reference_mixer(m, u), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mixer_gradients_equal_the_written_out_maths(ngroups):
    # the conv and the gated norm have hand-written backwards (generators/mamba_ops.py): the input's gradient and
    # every parameter's must be autograd's through the plain formulas (float32, ours; float64 recurrence, theirs)
    m = small_mixer(ngroups=ngroups)
    u = torch.randn(2, 29, 64)
    grads = []
    for fn in (m, lambda v: reference_mixer(m, v)):
        m.zero_grad()
        v = u.clone().requires_grad_()
        fn(v).square().sum().backward()
        grads.append([v.grad] + [p.grad.clone() for p in m.parameters()])
    for (name, _), ours, ref in zip([("input", None)] + list(m.named_parameters()), *grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                   msg=lambda text: f"{name}: {text}")


def test_the_hand_written_backwards_pass_gradcheck():
    # float64 finite differences; the conv's carried state (step() continues from it) gets its gradient too
    torch.manual_seed(0)
    x, prev = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    w, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(CausalConvSiLU.apply, [t.requires_grad_() for t in (x, prev, w, b)])
    y, z, weight = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((2, 5, 8), (2, 5, 8), (8,)))
    assert torch.autograd.gradcheck(lambda *t: GatedRMSNormFn.apply(*t, 1e-5, 4, True), [y, z, weight])


@torch.no_grad()
def test_step_in_pieces_equals_the_whole_sequence():
    m = small_mixer()
    u = torch.randn(3, 30, 64)
    full = m(u)
    # pieces shorter than the conv window (1, 2 tokens) must carry the conv inputs correctly
    for cuts in ([0, 1, 5, 14, 30], [0, 1, 2, 3, 30], [0, 30]):
        state, outs = None, []
        for a, b in zip(cuts, cuts[1:]):
            out, state = m.step(u[:, a:b], state)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=2e-6)
        assert state.conv.shape == (3, m.conv_dim, m.d_conv - 1)
        assert state.ssm.shape == (3, m.nheads, m.headdim, m.d_state)


@torch.no_grad()
def test_scan_chunk_does_not_change_the_result():
    m = small_mixer()
    u = torch.randn(2, 50, 64)
    outs = []
    for chunk in (1, 7, 64, 256):
        m.scan_chunk = chunk
        outs.append(m(u))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=2e-6)


def test_parameter_names_and_shapes_are_mamba_ssm_s(parity_root):
    """The released M-VAR-d16 key list (written by the official code, mamba_ssm.Mamba2 inside every block)."""
    keys = {}
    for line in (parity_root / "keys" / "keys_mvar_d16.txt").read_text().splitlines():
        if line.startswith("blocks.0.mamba."):
            name, shape = line.split("\t")[:2]
            keys[name.removeprefix("blocks.0.mamba.")] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert len(keys) == 8
    with torch.device("meta"):
        m = Mamba2(1024, d_state=64, d_conv=4, expand=2)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == keys


class ImportWatch(importlib.abc.MetaPathFinder):
    """Records every attempt to import mamba-ssm or causal-conv1d (and lets it continue)."""

    def __init__(self):
        self.seen = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "triton"):
            self.seen.append(name)
        return None


def test_cpu_path_never_imports_mamba_ssm_and_logs_its_choice(caplog, monkeypatch):
    watch = ImportWatch()
    monkeypatch.setattr(sys, "meta_path", [watch, *sys.meta_path])
    monkeypatch.setattr(mamba2_module, "_LOGGED", set())
    m = small_mixer()
    with caplog.at_level(logging.INFO, logger="scalegen.generators.mamba2"):
        out = m(torch.randn(1, 9, 64))
        m.step(torch.randn(1, 3, 64))
        out.sum().backward()
    assert watch.seen == [] and "mamba_ssm" not in sys.modules
    assert "Mamba2: PyTorch chunked scan (CPU tensors)" in caplog.text


def test_backend_errors_name_the_fix():
    with pytest.raises(ValueError, match="backend must be one of"):
        Mamba2(64, backend="cuda")
    m = Mamba2(64, d_state=16, backend="mamba_ssm")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        m(torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match="not divisible by headdim"):
        Mamba2(40, headdim=64)



@torch.no_grad()
def test_mixed_precision_keeps_the_scan_in_float32(monkeypatch):
    seen = []

    def spy(*args):
        seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype))
        return ssd_scan(*args)
    monkeypatch.setattr(mamba2_module, "ssd_scan", spy)
    m = small_mixer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 40, 64))
    assert seen == [(False, torch.bfloat16)]  # bf16 projections in, autocast off inside: the scan casts to float32
    assert out.dtype == torch.bfloat16
