"""Scale schedules: sizes, token counts, offsets, level ids, the block-causal mask, presets and the phi table."""

import math

import pytest
import torch

from scalegen.schedule.scales import VAR_256, VAR_512, ScaleSchedule, doubling
from scalegen.tokenizers import phi_table

# ---- construction ---------------------------------------------------------------------------------------------------


def test_of_ints_gives_square_sizes():
    sched = ScaleSchedule.of([1, 2, 4])
    assert sched.sizes == ((1, 1), (2, 2), (4, 4))
    assert len(sched) == 3 and sched.final == (4, 4)


def test_of_pairs_keeps_aspect_ratio():
    sched = ScaleSchedule.of([[1, 2], (2, 4), [3, 5]])
    assert sched.sizes == ((1, 2), (2, 4), (3, 5))
    assert sched.token_counts == [2, 8, 15]
    assert sched.final == (3, 5)


def test_of_mixed_and_idempotent():
    sched = ScaleSchedule.of([1, (2, 3), torch.tensor(4).item()])
    assert sched.sizes == ((1, 1), (2, 3), (4, 4))
    assert ScaleSchedule.of(sched) is sched
    assert ScaleSchedule.of(sched.sizes) == sched


@pytest.mark.parametrize("bad", [[], [0, 1], [1, (2, 0)], [(-1, 2)]])
def test_of_rejects_empty_and_non_positive(bad):
    with pytest.raises(ValueError):
        ScaleSchedule.of(bad)


# ---- counts and offsets of the VAR presets --------------------------------------------------------------------------


@pytest.mark.parametrize("preset, total", [(VAR_256, 680), (VAR_512, 2240)])
def test_var_presets_token_counts_and_offsets(preset, total):
    sched = ScaleSchedule.of(preset)
    assert sched.token_counts == [p * p for p in preset]
    assert sched.num_tokens == total == sum(p * p for p in preset)
    offsets = sched.offsets
    assert offsets[0][0] == 0 and offsets[-1][1] == total
    for (b0, e0), (b1, e1), n in zip(offsets, offsets[1:] + [(total, None)], sched.token_counts):
        assert e0 - b0 == n and e0 == b1  # contiguous, each scale exactly its tokens


def test_var_256_known_offsets():
    # VAR's begin_ends for patch_nums (1,2,3,4,5,6,8,10,13,16)
    ends = [1, 5, 14, 30, 55, 91, 155, 255, 424, 680]
    assert [e for _, e in ScaleSchedule.of(VAR_256).offsets] == ends


def test_level_ids():
    sched = ScaleSchedule.of([(1, 1), (2, 3), (2, 2)])
    lvl = sched.level_ids()
    assert lvl.dtype == torch.long and lvl.shape == (sched.num_tokens,)
    assert lvl.tolist() == [0] + [1] * 6 + [2] * 4
    big = ScaleSchedule.of(VAR_256).level_ids()
    assert torch.equal(torch.bincount(big), torch.tensor(ScaleSchedule.of(VAR_256).token_counts))
    assert bool((big[1:] >= big[:-1]).all())  # coarse to fine, non-decreasing


@pytest.mark.parametrize("spec", [[1, 2, 3], [(1, 1), (2, 3), (2, 2), 3], [1]])
def test_block_causal_bias_brute_force(spec):
    sched = ScaleSchedule.of(spec)
    bias = sched.block_causal_bias()
    L = sched.num_tokens
    assert bias.shape == (L, L) and bias.dtype == torch.float32
    scale_of = []
    for si, n in enumerate(sched.token_counts):
        scale_of += [si] * n
    for q in range(L):
        for k in range(L):
            expected = 0.0 if scale_of[k] <= scale_of[q] else -math.inf
            assert bias[q, k].item() == expected, (q, k)


def test_block_causal_bias_attention_sees_own_and_coarser_scales():
    sched = ScaleSchedule.of(VAR_256)
    bias = sched.block_causal_bias()
    allowed = bias == 0
    # every query of a scale sees exactly the keys up to the end of its own scale
    assert allowed.sum(1).tolist() == [end for begin, end in sched.offsets for _ in range(end - begin)]
    assert torch.isneginf(bias[~allowed]).all()


# ---- doubling and check_final ---------------------------------------------------------------------------------------


def test_doubling():
    assert doubling(16) == (1, 2, 4, 8, 16)
    assert doubling(1) == (1,)
    assert doubling(2) == (1, 2)
    for bad in (12, 0, 3, -4):
        with pytest.raises(ValueError):
            doubling(bad)


def test_check_final_names_the_key():
    sched = ScaleSchedule.of([1, 2, 4])
    sched.check_final((4, 4))
    with pytest.raises(ValueError, match=r"^scales:"):
        sched.check_final((8, 8))
    with pytest.raises(ValueError, match=r"^model\.scales:.*\(8, 8\)"):
        sched.check_final([8, 8], key="model.scales")
    with pytest.raises(ValueError):
        ScaleSchedule.of([(1, 2), (2, 4)]).check_final((4, 2))  # (h, w) order matters


# ---- which phi each scale uses --------------------------------------------------------------------------------------


def test_phi_table_released_10_scales():
    assert phi_table(4, 10) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


def test_phi_table_var_1024_preset():
    # VAR's 1024 px schedule has 14 scales; the official PhiPartiallyShared ticks give this table
    assert phi_table(4, 14) == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)


@pytest.mark.parametrize("n", [1, 4, 10, 14])
def test_phi_table_single_phi_all_zero(n):
    assert phi_table(1, n) == (0,) * n


@pytest.mark.parametrize("num_phi, n", [(4, 4), (4, 6), (2, 5), (3, 9), (4, 14)])
def test_phi_table_is_monotone_and_uses_first_and_last(num_phi, n):
    table = phi_table(num_phi, n)
    assert len(table) == n
    assert all(0 <= t < num_phi for t in table)
    assert list(table) == sorted(table)
    assert table[0] == 0 and table[-1] == num_phi - 1
