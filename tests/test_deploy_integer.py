"""refimpl.deploy.integer: integer-only inference against exact integer arithmetic, PyTorch's
quantized kernels (QNNPACK) and the simulated model.

What is asserted exactly and why it cannot depend on the CPU: the fixed-point arithmetic is
integer arithmetic (checked against Python integers); the "float32" requantisation is PyTorch's
convention, and QNNPACK computes it with the same IEEE float32 operations on every x86/ARM CPU
(bit-exact per layer, on identical input codes). The comparison with the simulation (a float32
conv whose summation order varies with the CPU) is asserted only coarsely.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch

from refimpl.deploy import REQUANT_MODES, integer_model, simulated_codes, site_agreement, torch_quantized_layer
from refimpl.fold import fold_all_bn
from refimpl.models import MobileNetV2CNN, ResNetCNN
from refimpl.neon import fixed_point_multiply
from testmodels import randomize_bn
from refimpl.qmodel import QuantConfig, act_quantizers, calibrate, freeze, quantize_model

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# ---- exact arithmetic -----------------------------------------------------------------------
def _sat(v):
    return max(INT32_MIN, min(INT32_MAX, v))


def _arm_reference(x, m, shift):
    """SQSHL, SQRDMULH, SRSHL from the ARM ARM pseudo-code, on Python integers."""
    x = _sat(x << max(shift, 0))
    x = _sat((2 * x * m + (1 << 31)) >> 32)                 # SQRDMULH
    r = max(-shift, 0)
    return (x + (1 << (r - 1))) >> r if r else x           # SRSHL by -r: rounding constant 2^(r-1)


def test_fixed_point_multiply_matches_arm_pseudocode():
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.integers(INT32_MIN, INT32_MAX, 2000, endpoint=True),
                         [0, 1, -1, INT32_MIN, INT32_MAX, 1 << 20, -(1 << 20)]])
    for m, shift in [(1 << 30, -1), ((1 << 31) - 1, 0), (1518500250, -7), (1 << 30, 3), (1431655765, -31),
                     (2147483647, 31), (1 << 30, -20)]:
        got = fixed_point_multiply(xs, m, shift)
        want = np.array([_arm_reference(int(x), m, shift) for x in xs])
        np.testing.assert_array_equal(got, want)


def test_srshl_ties_go_up_and_sqrdmulh_rounds_before_the_shift():
    # 3 * 2^30 / 2^31 = 1.5 -> SQRDMULH gives 2; x = -3: -1.5 -> -1 (ties up)
    assert fixed_point_multiply(3, 1 << 30, 0) == 2
    assert fixed_point_multiply(-3, 1 << 30, 0) == -1
    # an exact negative tie in the shift: -6 * 0.5 = -3, then -3 / 2 = -1.5 -> -1 (SRSHL), not -2
    assert fixed_point_multiply(-6, 1 << 30, -1) == -1
    # double rounding: 13 * 0.5859375 = 7.617 -> 8 (SQRDMULH), then 8 / 16 = 0.5 -> 1 (SRSHL);
    # the exact 13 * 0.5859375 / 16 = 0.476 rounds to 0
    m = int(0.5859375 * (1 << 31))
    assert fixed_point_multiply(13, m, -4) == 1
    assert fixed_point_multiply(13, m, -4, single_rounding=True) == 0


def test_single_rounding_is_the_exact_product_rounded_once():
    rng = np.random.default_rng(1)
    xs = rng.integers(-(1 << 24), 1 << 24, 3000)
    for m, shift in [(1518500250, -7), (1 << 30, -1), (1900000000, -12), (1 << 30, 2), ((1 << 31) - 1, 0)]:
        got = fixed_point_multiply(xs, m, shift, single_rounding=True)
        exact = [Fraction(int(x) * m, 1 << 31) * Fraction(2) ** shift for x in xs]
        want = np.array([_sat(int((v + Fraction(1, 2)).__floor__())) for v in exact])
        np.testing.assert_array_equal(got, want)
        # two roundings are never more than one code away from one
        assert np.abs(fixed_point_multiply(xs, m, shift) - got).max() <= 1


# ---- whole models ----------------------------------------------------------------------------
def _qmodel(kind="resnet2d", config=None, seed=0):
    torch.manual_seed(seed)
    if kind == "resnet2d":
        model, shape = ResNetCNN(1, 10, width=4, num_blocks=2), (1, 8, 8)
    elif kind == "resnet1d":
        model, shape = ResNetCNN(1, 10, width=8, num_blocks=2, dims=1), (1, 40)
    else:
        model, shape = MobileNetV2CNN(1, 10, width=8), (1, 8, 8)
    gen = torch.Generator().manual_seed(seed)
    qm = quantize_model(fold_all_bn(randomize_bn(model, seed)), config or QuantConfig())
    calibrate(qm, torch.randn(128, *shape, generator=gen))
    return qm, torch.randn(256, *shape, generator=gen)


MODELS = ["resnet2d", "resnet1d", "mobilenet"]
needs_qnnpack = pytest.mark.skipif("qnnpack" not in torch.backends.quantized.supported_engines,
                                   reason="this PyTorch build has no QNNPACK engine")


@needs_qnnpack
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_float32_requant_is_bit_exact_with_qnnpack_per_layer(kind, per_channel):
    qm, x = _qmodel(kind, QuantConfig(weight_per_channel=per_channel))
    im = integer_model(qm, "float32")
    _, codes = im.run(x, codes=True)
    layers = [s for s in im.steps if s.op in ("conv", "linear")]
    assert len(layers) >= 5
    for step in layers:
        ref = torch_quantized_layer(step, codes[step.inputs[0]], "qnnpack")
        np.testing.assert_array_equal(codes[step.name], ref, err_msg=step.name)


@needs_qnnpack
def test_fixed_point_differs_from_qnnpack_by_at_most_one_code():
    qm, x = _qmodel("resnet2d")
    im = integer_model(qm, "fixed_point")
    _, codes = im.run(x, codes=True)
    differ = 0
    for step in (s for s in im.steps if s.op in ("conv", "linear")):
        d = np.abs(codes[step.name] - torch_quantized_layer(step, codes[step.inputs[0]]))
        assert d.max() <= 1, step.name
        differ += int((d > 0).sum())
    assert differ > 0     # the two conventions are not the same function on a real model


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("requant", REQUANT_MODES)
def test_integer_model_agrees_with_the_simulation(kind, requant):
    qm, x = _qmodel(kind)
    im = integer_model(qm, requant)
    out = im.run(x)
    with torch.no_grad():
        ref = qm(x).numpy()
    assert out.shape == ref.shape and out.dtype == np.float32
    # coarse: a wrong scale, zero point, clamp or op moves most codes by many steps
    steps = np.abs(out - ref) / im.output_grid.scale
    assert steps.max() <= 4 + 1e-3
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    rows = site_agreement(im, qm, x)
    assert [r["site"] for r in rows] == list(simulated_codes(qm, x))
    assert rows[0]["op"] == "quantize" and rows[0]["max_diff"] == 0   # same input rounding
    assert all(r["differ"] <= 0.3 for r in rows)


def test_steps_identity_relu6_and_depthwise_are_compiled():
    qm, x = _qmodel("mobilenet")
    im = integer_model(qm)
    ops = [s.op for s in im.steps]
    assert ops[0] == "quantize" and ops.count("add") >= 1 and "avg_pool" in ops
    assert any(s.op == "conv" and s.attrs["groups"] > 1 for s in im.steps)
    # a ReLU6 site: clamp at zero point and at the code of 6.0
    relu6 = [s for s in im.steps if s.attrs.get("activation") == "relu6"]
    assert relu6
    for s in relu6:
        six = int(np.rint(np.float32(6.0) / np.float32(s.grid.scale)))
        assert s.lo == max(s.grid.qmin, s.grid.zero_point) and s.hi == min(s.grid.qmax, s.grid.zero_point + six)


def test_input_dtypes():
    qm, x = _qmodel("resnet2d")
    im = integer_model(qm)
    ref = im.run(x)
    np.testing.assert_array_equal(im.run(x.numpy()), ref)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        np.testing.assert_array_equal(im.run(xd), im.run(xd.float()))
    with pytest.raises(TypeError, match="x must be"):
        im.run(torch.zeros(2, 1, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="batch_size"):
        im.run(x, batch_size=0)
    # batching does not change the result
    np.testing.assert_array_equal(im.run(x, batch_size=7), ref)


# ---- errors ----------------------------------------------------------------------------------
def test_errors_name_the_problem():
    qm, _ = _qmodel("resnet2d")
    with pytest.raises(TypeError, match="GraphModule"):
        integer_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="requant must be one of"):
        integer_model(qm, "double")
    qm.train()
    with pytest.raises(ValueError, match="training mode"):
        integer_model(qm)
    qm.eval()
    qkeep, _ = _qmodel("resnet2d", QuantConfig(keep_fp=("head",)))
    with pytest.raises(ValueError, match="'head'.*not quantized"):
        integer_model(qkeep)
    q1, _ = _qmodel("resnet2d", QuantConfig(insertion=1))
    with pytest.raises(ValueError, match="blocks_0_shortcut.*not quantized"):
        integer_model(q1)
    qpot, _ = _qmodel("resnet2d", QuantConfig(weight_quantizer="pot"))
    with pytest.raises(TypeError, match="not an affine grid"):
        integer_model(qpot)
    qlsq, _ = _qmodel("resnet2d", QuantConfig(weight_quantizer="lsq", act_quantizer="lsq"))
    with pytest.raises(TypeError, match="training form.*freeze"):
        integer_model(qlsq)
    freeze(qlsq)
    integer_model(qlsq)
    qwide, _ = _qmodel("resnet2d", QuantConfig(act_bits=16))
    with pytest.raises(ValueError, match="16-bit grid"):
        integer_model(qwide)
    qobs, _ = _qmodel("resnet2d")
    act_quantizers(qobs)["input"].set_state("observe")
    with pytest.raises(ValueError, match="activation site 'input' is still observing"):
        integer_model(qobs)
    with pytest.raises(ValueError, match="BatchNorm"):
        integer_model(quantize_model(ResNetCNN(1, 10, width=4, num_blocks=1).eval(), QuantConfig(), keep_bn=True))


def test_isolated_agreement_measures_one_step_at_a_time():
    qm, x = _qmodel("resnet2d")
    im = integer_model(qm, "float32")
    sim = simulated_codes(qm, x)
    chain = site_agreement(im, qm, x)
    alone = site_agreement(im, qm, x, isolated=True)
    assert [r["site"] for r in alone] == [r["site"] for r in chain]
    # with the simulation's codes fed in, the first conv sees identical inputs either way
    assert alone[1] == chain[1]
    # given= replaces what later steps read, not what a step returns
    _, codes = im.run(x, codes=True, given=sim)
    np.testing.assert_array_equal(codes["input"], sim["input"])
    with pytest.raises(ValueError, match="given names steps"):
        im.run(x, given={"nope": sim["input"]})


def test_layer_operands_give_the_exact_accumulators():
    from refimpl.deploy import layer_operands
    qm, x = _qmodel("resnet1d")
    im = integer_model(qm, "float32")
    _, codes = im.run(x, codes=True)
    for step in (s for s in im.steps if s.op in ("conv", "linear")):
        a, b, zp = layer_operands(step, codes[step.inputs[0]])
        acc = a @ b - zp * b.sum(0)
        ref = torch_quantized_layer(step, codes[step.inputs[0]])
        real = np.asarray(step.attrs["real_f32"]).reshape(1, -1)
        bias = 0 if step.bias is None else step.bias.reshape(1, -1)
        q = np.clip(np.rint((acc + bias).astype(np.float32) * real).astype(np.int64) + step.grid.zero_point,
                    step.lo, step.hi)
        np.testing.assert_array_equal(np.moveaxis(ref, 1, -1).reshape(-1, ref.shape[1]), q)


def test_pair_saturating_matmul():
    from refimpl.deploy import pair_saturating_matmul
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 128, (50, 31)), rng.integers(-128, 128, (31, 7))
    out, sat = pair_saturating_matmul(a, b)      # 7-bit activations: never saturates
    assert sat == 0 and np.array_equal(out, a @ b)
    a = np.full((1, 4), 255)
    b = np.array([[-128], [-128], [1], [1]])
    out, sat = pair_saturating_matmul(a, b)
    assert sat == 1 and out[0, 0] == -32768 + 510
    with pytest.raises(ValueError, match="unsigned bytes"):
        pair_saturating_matmul(-a, b)


def test_a_site_switched_off_leaves_its_layer_without_an_output_grid():
    qm, _ = _qmodel("resnet2d")
    act_quantizers(qm)["blocks.0.conv2"].set_state("off")
    with pytest.raises(ValueError, match="output of 'blocks.0.conv2' before any activation site"):
        integer_model(qm)


def test_layer_accumulators_requantise_to_the_steps_codes():
    from refimpl.deploy import layer_accumulators
    from refimpl.neon import requantize
    qm, x = _qmodel("resnet1d")
    im = integer_model(qm)
    _, codes = im.run(x, codes=True)
    for step in (s for s in im.steps if s.op in ("conv", "linear")):
        acc = layer_accumulators(step, codes[step.inputs[0]], bias=False)
        out = requantize(acc, step.bias, step.multiplier, step.shift, step.grid.zero_point, step.lo, step.hi)
        want = codes[step.name] if step.op == "linear" else np.moveaxis(codes[step.name], 1, -1)
        np.testing.assert_array_equal(out.astype(np.int64), want.reshape(out.shape), err_msg=step.name)


def test_srshl_ties_against_python_integers():
    from refimpl.neon import srshl_ties
    xs = np.arange(-70, 70)
    for shift in (-1, -3, 0, 2):
        r = -min(shift, 0)
        want = [r > 0 and (x % (1 << r)) == (1 << (r - 1)) for x in xs.tolist()]
        assert srshl_ties(xs, shift).tolist() == want
