"""LogQuant, PoT and APoT grids (refimpl.quant.apot) and the "pot"/"apot" quantizer kinds."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
from torch import nn

from refimpl.fold import fold_all_bn
from refimpl.models import ResNetCNN
from refimpl.qmodel import (QuantConfig, act_quantizers, calibrate, freeze, quantize_model, set_kind_options,
                            set_trainable, weight_quantizers)
from refimpl.quant import (apot_alpha_search, apot_levels, apot_quant, apot_terms, apot_weight_terms, bitshift_dot, log_levels, log_quant,
                           pot_levels, pot_quant, pow2_levels, weight_norm)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# The official level construction, written out from the paper's definition
# --------------------------------------------------------------------------------------------
# Li et al. 2020 with k = 2, as build_power_value (yhhhli/APoT_Quantization @c31dd73,
# ImageNet/models/quant_layer.py) enumerates the base sets for B magnitude bits; levels are all
# sums a + b + c, divided by their maximum.
OFFICIAL_BASES = {
    1: [[0, 2 ** -1]],     # not in build_power_value: 2-bit weights are uniform {-1, 0, 1} there
    2: [[0, 2 ** -1, 2 ** -2, 2 ** -3]],
    3: [[0, 2 ** -1, 2 ** -2, 2 ** -4], [0, 2 ** -3]],
    4: [[0, 2 ** -1, 2 ** -3, 2 ** -5], [0, 2 ** -2, 2 ** -4, 2 ** -6]],
    5: [[0, 2 ** -1, 2 ** -3, 2 ** -6], [0, 2 ** -2, 2 ** -4, 2 ** -7], [0, 2 ** -5]],
    6: [[0, 2 ** -1, 2 ** -4, 2 ** -7], [0, 2 ** -2, 2 ** -5, 2 ** -8], [0, 2 ** -3, 2 ** -6, 2 ** -9]],
}


def _official(B):
    sums = sorted({sum(t) for t in itertools.product(*OFFICIAL_BASES[B])})
    return [s / sums[-1] for s in sums]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_apot_levels_match_the_official_construction(bits):
    # activations: B = bits, unsigned
    got = apot_levels(bits, 2, 1.0, signed=False)
    assert got.tolist() == _official(bits)
    assert got.numel() == 2 ** bits
    # weights: B = bits - 1 magnitude bits and a sign
    mags = _official(bits - 1)
    signed = sorted({-m for m in mags} | set(mags))
    got = apot_levels(bits, 2, 2.5, signed=True)
    assert got.tolist() == [2.5 * v for v in signed]
    assert got.numel() == 2 ** bits - 1


def test_apot_levels_by_hand_4bit_unsigned():
    # p0 in {0, 1, 1/4, 1/16}, p1 in {0, 1/2, 1/8, 1/32} (paper's example, b = 4, k = 2), gamma = 1 / 1.5
    p0, p1 = [0, 1, 1 / 4, 1 / 16], [0, 1 / 2, 1 / 8, 1 / 32]
    want = sorted({(a + b) / 1.5 for a in p0 for b in p1})
    assert torch.allclose(apot_levels(4, 2, 1.0, signed=False), torch.tensor(want, dtype=torch.float64),
                          rtol=0, atol=1e-15)


def test_apot_k1_is_uniform_and_k_equal_b_is_pot():
    for bits in (3, 4, 5):
        uni = apot_levels(bits, 1, 1.0, signed=False)
        assert torch.allclose(uni, torch.arange(2 ** bits, dtype=torch.float64) / (2 ** bits - 1), atol=1e-15)
        assert torch.equal(apot_levels(bits, bits - 1, 1.0), pot_levels(bits, 1.0))
        assert torch.equal(apot_levels(bits, bits, 1.0, signed=False), pot_levels(bits, 1.0, signed=False))


def test_pot_levels_hand_computed_and_pow2():
    # Q^p(1, 5), 5-bit signed: magnitudes 0, 2^-14 .. 2^-1, 1 (2^4 = 16 codes)
    lv = pot_levels(5, 1.0)
    pos = lv[lv > 0]
    assert pos[:2].tolist() == [2 ** -14, 2 ** -13]      # two smallest: 6.1e-5 apart
    assert pos[-2:].tolist() == [0.5, 1.0]                # two largest: 0.5 apart
    assert lv.numel() == 31
    assert torch.equal(lv, pow2_levels(5, 1.0))
    assert pot_levels(3, 2.0, signed=False).tolist() == [0, 2 * 2 ** -6, 2 * 2 ** -5, 2 * 2 ** -4, 2 * 2 ** -3,
                                                          2 * 2 ** -2, 2 * 2 ** -1, 2.0]


# --------------------------------------------------------------------------------------------
# LogQuant
# --------------------------------------------------------------------------------------------
def test_log_quant_definition():
    # bitwidth 2, FSR 0: exponents -4..0
    x = torch.tensor([0.0, 1.0, -1.0, 3.0, 0.72, 0.70, 0.71, -0.3, 1e-9, 0.0625, 0.044, 0.045], dtype=torch.float64)
    want = []
    for v in x.tolist():
        if v == 0:
            want.append(0.0)
        else:
            e = min(max(round(math.log2(abs(v))), -4), 0)
            want.append(math.copysign(2.0 ** e, v))
    got = log_quant(x, 2, 0)
    assert got.tolist() == want
    # log-domain rounding: the boundary between 1/2 and 1 is 2^-1/2 = 0.7071, not their midpoint 0.75
    assert got[4] == 1.0 and got[6] == 1.0 and got[5] == 0.5
    assert log_levels(2, 0).tolist() == [-1, -0.5, -0.25, -0.125, -0.0625, 0, 0.0625, 0.125, 0.25, 0.5, 1]
    assert set(got.tolist()) <= set(log_levels(2, 0).tolist())


def test_log_quant_ste():
    x = torch.tensor([0.3, -0.9, 2.5, -3.0, 0.01], requires_grad=True)
    log_quant(x, 3, 1).sum().backward()       # range |x| <= 2
    assert x.grad.tolist() == [1, 1, 0, 0, 1]


def test_bitshift_dot_equals_dequantized_dot():
    g = _gen(1)
    w = torch.randn(5, 64, generator=g, dtype=torch.float64) * 0.3
    w[0, :5] = 0
    x_int = torch.randint(-128, 128, (64,), generator=g)
    wq, codes = log_quant(w, 3, 0, return_codes=True)
    acc, shift = bitshift_dot(codes, x_int)
    assert acc.dtype == torch.int64 and acc.shape == (5,)
    ref = wq @ x_int.double()
    assert torch.equal(acc.double() * 2.0 ** shift, ref)
    # the codes reconstruct the weights
    sign, e = codes
    assert torch.equal(sign.double() * torch.pow(2.0, e.double()), wq)
    with pytest.raises(ValueError, match="overflow"):
        bitshift_dot(codes, x_int * 2 ** 60)
    with pytest.raises(TypeError, match="x_int"):
        bitshift_dot(codes, x_int.float())


# --------------------------------------------------------------------------------------------
# PoT / APoT quantizers and their gradients
# --------------------------------------------------------------------------------------------
def _nearest(u, levels):
    return torch.tensor([min(levels, key=lambda l: (abs(v - l), abs(l))) for v in u.tolist()], dtype=torch.float64)


@pytest.mark.parametrize("signed", [True, False])
def test_apot_quant_forward_is_clip_then_nearest(signed):
    x = torch.randn(300, generator=_gen(2), dtype=torch.float64) * 2
    alpha = 1.7
    lv = apot_levels(4, 2, 1.0, signed=signed).tolist()
    u = (x / alpha).clamp(-1 if signed else 0, 1)
    want = alpha * _nearest(u, lv)
    assert torch.allclose(apot_quant(x, 4, alpha, signed=signed), want, rtol=0, atol=1e-15)
    lvp = pot_levels(4, 1.0, signed=signed).tolist()
    assert torch.allclose(pot_quant(x, 4, alpha, signed=signed), alpha * _nearest(u, lvp), rtol=0, atol=1e-15)


def _surrogate(x, alpha, alpha0, levels, lo):
    """The authors' forward as a function of alpha with the rounding frozen at alpha0 (STE)."""
    c0 = (x / alpha0).clamp(lo, 1)
    q0 = _nearest(c0, levels)
    c = (x / alpha).clamp(lo, 1)
    return alpha * (q0 + c - c0)


@pytest.mark.parametrize("fn,signed", [("apot", True), ("apot", False), ("pot", True)])
def test_rcf_alpha_gradient_matches_finite_differences(fn, signed):
    x = torch.randn(200, generator=_gen(3), dtype=torch.float64) * 1.5
    g = torch.randn(200, generator=_gen(4), dtype=torch.float64)
    a0 = 1.3
    alpha = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
    quant = apot_quant if fn == "apot" else pot_quant
    xr = x.clone().requires_grad_(True)
    (quant(xr, 4, alpha, signed=signed) * g).sum().backward()
    lo = -1.0 if signed else 0.0
    levels = (apot_levels(4, 2, 1.0, signed=signed) if fn == "apot" else pot_levels(4, 1.0, signed=signed)).tolist()
    h = 1e-6
    fd = ((_surrogate(x, a0 + h, a0, levels, lo) - _surrogate(x, a0 - h, a0, levels, lo)) * g).sum() / (2 * h)
    assert abs(alpha.grad.item() - fd.item()) < 1e-6
    # and the paper's closed form: sign(x) (the clipped value) outside, q(x/a) - x/a inside
    u = x / a0
    inside = (u >= lo) & (u <= 1)
    q = _nearest(u.clamp(lo, 1), levels)
    closed = torch.where(inside, q - u, u.clamp(lo, 1))
    assert abs(alpha.grad.item() - (closed * g).sum().item()) < 1e-9
    # x: STE, 1 inside the range and 0 outside
    assert torch.equal(xr.grad, g * inside.double())


def test_rcf_off_gives_no_alpha_gradient_inside():
    x = torch.tensor([0.2, -0.4, 3.0, -5.0])
    alpha = torch.tensor(1.0, requires_grad=True)
    apot_quant(x, 4, alpha, rcf=False).sum().backward()
    assert alpha.grad.item() == pytest.approx(0.0)       # +1 - 1 outside, 0 inside
    alpha.grad = None
    apot_quant(x[:3], 4, alpha, rcf=False).sum().backward()
    assert alpha.grad.item() == pytest.approx(1.0)


def test_weight_norm():
    w = torch.randn(4, 3, 3, generator=_gen(5), dtype=torch.float64) * 0.2 + 0.1
    ref = (w - w.mean()) / w.std()
    assert torch.allclose(weight_norm(w), ref, rtol=1e-12, atol=1e-12)
    wr = w.clone().requires_grad_(True)
    wr2 = w.clone().requires_grad_(True)
    gout = torch.randn(w.shape, generator=_gen(6), dtype=torch.float64)
    (weight_norm(wr) * gout).sum().backward()
    (((wr2 - wr2.mean()) / wr2.std()) * gout).sum().backward()
    assert torch.allclose(wr.grad, wr2.grad, atol=1e-10)
    with pytest.raises(ValueError, match="constant"):
        weight_norm(torch.ones(5))
    with pytest.raises(ValueError, match="two elements"):
        weight_norm(torch.ones(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    x = torch.randn(64, generator=_gen(7)).to(dtype)
    ref = x.double()
    for fn, args in ((apot_quant, (4, 1.5)), (pot_quant, (4, 1.5)), (log_quant, (3, 0))):
        out = fn(x, *args)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, fn(ref, *args).to(dtype))
    assert weight_norm(x).dtype == dtype
    assert torch.allclose(weight_norm(x).double(), weight_norm(ref), atol=0.02)


def test_errors_name_the_parameter():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="k must divide"):
        apot_levels(7, 4, 1.0)                    # B = 6, k = 4
    with pytest.raises(ValueError, match="k must divide"):
        apot_levels(4, 3, 1.0, signed=False)      # B = 4, k = 3
    with pytest.raises(ValueError, match="k must be in"):
        apot_levels(4, 5, 1.0)
    with pytest.raises(ValueError, match="bits"):
        apot_levels(9, 2, 1.0)
    with pytest.raises(ValueError, match="bits"):
        pot_levels(1, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        apot_levels(4, 2, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        pot_quant(x, 4, -1.0)
    with pytest.raises(ValueError, match="alpha"):
        apot_quant(x, 4, torch.tensor(0.0))
    with pytest.raises(ValueError, match="fsr"):
        log_quant(x, 3, 100)
    with pytest.raises(ValueError, match="bits"):
        log_levels(0, 0)
    with pytest.raises(TypeError, match="fsr"):
        log_quant(x, 3, 0.5)


# --------------------------------------------------------------------------------------------
# The "pot" and "apot" quantizer kinds
# --------------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return fold_all_bn(ResNetCNN(1, 10, width=8, num_blocks=1, dims=2).eval())


def _x():
    return torch.randn(16, 1, 8, 8, generator=_gen(8))


@pytest.mark.parametrize("kind", ["pot", "apot"])
def test_kind_through_quantize_model(kind):
    cfg = QuantConfig(weight_bits=4, act_bits=4, weight_quantizer=kind, act_quantizer=kind)
    q = quantize_model(_model(), cfg)
    x = _x()
    calibrate(q, x)
    conv = q.get_submodule("stem.conv")
    wq = conv.weight_quantizer
    w = conv.weight.detach()
    # alpha starts at the calibrated range's max |w|
    assert wq.alpha.item() == pytest.approx(w.abs().max().item(), rel=1e-6)
    fn = apot_quant if kind == "apot" else pot_quant
    assert torch.equal(wq(w), fn(w, 4, wq.alpha.detach()))
    params = set_trainable(q, kind)
    assert any(p is wq.alpha for p in params)
    out = q(x)
    out.square().mean().backward()
    assert wq.alpha.grad is not None and wq.alpha.grad.abs().item() > 0
    with pytest.raises(TypeError, match="non-uniform"):
        wq.export()
    # state_dict round trip keeps a trained alpha
    with torch.no_grad():
        wq.alpha.mul_(0.8)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    q2 = quantize_model(_model(), cfg)
    calibrate(q2, x)
    buf.seek(0)
    q2.load_state_dict(torch.load(buf))
    assert q2.get_submodule("stem.conv").weight_quantizer.alpha.item() == wq.alpha.item()
    assert torch.equal(q2(x), q(x))
    # leaving the kind removes alpha
    set_trainable(q, "fixed")
    assert not hasattr(wq, "alpha") and "alpha" not in dict(wq.named_parameters())


def test_apot_kind_weight_normalization():
    q = quantize_model(_model(), QuantConfig(weight_bits=4, act_bits=None, weight_quantizer="apot"))
    conv = q.get_submodule("stem.conv")
    wq = conv.weight_quantizer
    assert wq.weight_normalization is False and wq.apot_k == 2 and wq.rcf is True
    w = conv.weight.detach()
    alpha_raw = wq.alpha.item()
    assert alpha_raw == pytest.approx(w.abs().max().item(), rel=1e-6)
    wq.set_option("weight_normalization", True)
    # alpha is now in units of the weight's standard deviation, starting at the authors' 3.0
    assert wq.alpha.item() == 3.0
    assert torch.equal(wq(w), apot_quant(weight_norm(w), 4, torch.tensor(3.0)))
    m = copy.deepcopy(q)
    assert m.get_submodule("stem.conv").weight_quantizer.weight_normalization is True
    assert isinstance(wq.alpha, nn.Parameter)
    wq.set_option("weight_normalization", False)
    assert wq.alpha.item() == pytest.approx(alpha_raw)
    # k = 1 is the uniform grid with the same clipping
    wq.set_option("apot_k", 1)
    assert torch.equal(wq(w), apot_quant(w, 4, wq.alpha.detach(), 1))


def test_kind_options_errors_and_whole_model():
    q = quantize_model(_model(), QuantConfig(weight_bits=4, act_bits=4, weight_quantizer="pot", act_quantizer="pot"))
    calibrate(q, _x())
    wq = q.get_submodule("stem.conv").weight_quantizer
    with pytest.raises(ValueError, match="option must be one of.*rcf"):
        wq.set_option("apot_k", 2)
    with pytest.raises(TypeError, match="'rcf'.*bool"):
        wq.set_option("rcf", 1)
    set_kind_options(q, {"rcf": False})
    assert all(not m.rcf for m in list(weight_quantizers(q).values()) + list(act_quantizers(q).values()))
    set_kind_options(q, {"weight_normalization": True}, acts=False)
    assert all(m.weight_normalization for m in weight_quantizers(q).values())
    with pytest.raises(ValueError, match=r"\['apot_k'\] belong to none.*\['pot'\]"):
        set_kind_options(q, {"apot_k": 2})
    with pytest.raises(TypeError, match="options must be a dict"):
        set_kind_options(q, [("rcf", True)])
    fixed = quantize_model(_model(), QuantConfig(weight_bits=4, act_bits=None))
    with pytest.raises(ValueError, match="'fixed' quantizer kind has no options"):
        fixed.get_submodule("stem.conv").weight_quantizer.set_option("rcf", True)


def test_freeze_keeps_non_uniform_kinds():
    q = quantize_model(_model(), QuantConfig(weight_bits=4, act_bits=4, weight_quantizer="apot", act_quantizer="dsq"))
    calibrate(q, _x())
    freeze(q)
    assert {m.kind for m in weight_quantizers(q).values()} == {"apot"}
    assert {m.kind for m in act_quantizers(q).values()} == {"fixed"}


# --------------------------------------------------------------------------------------------
# Power-of-two terms per level (the cost of a multiply)
# --------------------------------------------------------------------------------------------
def test_apot_terms_by_hand_4bit_unsigned():
    # p0 in {0, 1, 1/4, 1/16}, p1 in {0, 1/2, 1/8, 1/32}: a level's terms are its nonzero p_i
    p0, p1 = [0, 1, 1 / 4, 1 / 16], [0, 1 / 2, 1 / 8, 1 / 32]
    want = [n for _, n in sorted(((a + b), (a > 0) + (b > 0)) for a in p0 for b in p1)]
    assert apot_terms(4, 2, signed=False).tolist() == want


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_apot_terms_official_construction_uniform_and_pot(bits):
    # k = 2: as many terms as nonzero base-set entries in the sum (official bases, weights B = bits - 1)
    B = bits - 1
    combos = sorted((sum(t), sum(v > 0 for v in t)) for t in itertools.product(*OFFICIAL_BASES[B]))
    mags = [n for _, n in combos]
    assert apot_terms(bits, 2).tolist() == mags[1:][::-1] + mags
    assert apot_terms(bits, 2).numel() == apot_levels(bits, 2, 1.0).numel()
    # k = 1: the set bits of the integer code; PoT (k = B): one term per nonzero level
    assert apot_terms(bits, 1, signed=False).tolist() == [bin(j).count("1") for j in range(2 ** bits)]
    if B >= 2:
        pot = apot_terms(bits, B)
        assert pot.tolist() == [1] * (2 ** B - 1) + [0] + [1] * (2 ** B - 1)
    with pytest.raises(ValueError, match="bits"):
        apot_terms(9, 2)


def test_apot_weight_terms_counts_the_terms_of_each_quantized_level():
    x = torch.randn(500, generator=_gen(21)) * 1.3
    for bits, k in ((4, 2), (5, 2), (4, 1), (4, 3)):
        alpha = 2.5
        t = apot_weight_terms(x, bits, alpha, k)
        q = apot_quant(x, bits, alpha, k).double() / alpha          # the level each value lands on
        levels, terms = apot_levels(bits, k, 1.0), apot_terms(bits, k)
        idx = (q[:, None] - levels[None, :]).abs().argmin(1)
        assert t.dtype == torch.int64 and t.shape == x.shape
        assert torch.equal(t, terms[idx]), (bits, k)
    # PoT (k = B): one term for every nonzero weight; zero weights cost nothing
    t = apot_weight_terms(x, 4, 2.5, 3)
    assert set(t.tolist()) <= {0, 1} and int(t.sum()) == int((apot_quant(x, 4, 2.5, 3) != 0).sum())


def test_apot_alpha_search_is_the_grid_minimum():
    x = torch.randn(300, generator=_gen(22))
    alphas = torch.linspace(0.5, 4.0, 15)
    alpha, err = apot_alpha_search(x, 4, 2, alphas)
    brute = [float(((apot_quant(x, 4, float(a), 2) - x) ** 2).sum()) for a in alphas]
    assert err == min(brute) and alpha == float(alphas[brute.index(min(brute))])
    assert 0.5 < alpha < 4.0            # an interior minimum for a standard normal
    with pytest.raises(ValueError, match="alphas must be a non-empty set of values > 0"):
        apot_alpha_search(x, 4, 2, [0.0, 1.0])
    with pytest.raises(ValueError, match="alphas"):
        apot_alpha_search(x, 4, 2, [])
