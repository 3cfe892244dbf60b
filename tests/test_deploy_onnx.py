"""refimpl.deploy.onnx: a quantize_model graph exported to ONNX in QDQ form and run by onnxruntime.

Agreement is measured in output quantization steps: the scale of the last activation site
("head", the logits' site under insertion pattern 3). Two onnxruntime sessions are used:

* graph optimizations off: onnxruntime runs the ONNX operators as the spec defines them (float
  Conv/Gemm on dequantized tensors, QuantizeLinear/DequantizeLinear), which is what the exported
  graph *means*; bound: one output step;
* default optimizations (ORT_ENABLE_ALL): onnxruntime fuses the QDQ groups into integer kernels
  (QLinearConv, QLinearAdd, QLinearGlobalAveragePool), which requantize exact int32 sums with a
  float multiplier where the simulation rounds a float32 sum, and one-code differences at inner
  sites can add up. Those kernels differ between CPUs (on x86 without VNNI the u8 x s8 products
  are summed in pairs with int16 saturation), so only a coarse property is asserted for them:
  the predicted classes agree on nearly every input (a wrong graph would agree on ~10 %).
  On this machine (AVX-512) they were measured at most two output steps from the simulation.

The fractions of differing elements asserted below are coarse on purpose (a wrong scale, zero
point or op moves nearly every element); they are not tuned to one machine's float path.
"""

import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx import helper

from refimpl.deploy import ONNX_OPSET, export_qdq
from refimpl.deploy import export_float
from refimpl.fold import fold_all_bn
from refimpl.models import ResNetCNN
from refimpl.models import MobileNetV2CNN
from refimpl.qmodel import (QuantConfig, act_quantizers, calibrate, freeze, quant_layers, quantize_model,
                            set_trainable)
from testmodels import randomize_bn

TOL = 1 + 1e-5      # a difference of k steps is k * scale in float32: allow its rounding


def _tiny(config, calibrate_it=True, seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(ResNetCNN(1, 10, width=4, num_blocks=2), seed)
    qm = quantize_model(fold_all_bn(model), config)
    gen = torch.Generator().manual_seed(seed + 1)
    if calibrate_it:
        calibrate(qm, torch.randn(64, 1, 8, 8, generator=gen))
    return qm, torch.randn(256, 1, 8, 8, generator=gen)


def _run(onx, x, optimize=False):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(onx.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _steps(qm, onx, x, optimize=False):
    """|onnxruntime - refimpl| in units of the last activation site's scale."""
    with torch.no_grad():
        ref = qm(x).numpy()
    out = _run(onx, x, optimize)
    assert out.shape == ref.shape
    step = float(list(act_quantizers(qm).values())[-1].export()["scale"])
    return np.abs(out - ref) / step


def _inits(onx):
    return {t.name: numpy_helper.to_array(t) for t in onx.graph.initializer}


W8A8 = [pytest.param(pc, sym, id=f"{'per_channel' if pc else 'per_tensor'}-{'sym' if sym else 'asym'}")
        for pc in (True, False) for sym in (True, False)]


@pytest.mark.parametrize("per_channel, act_symmetric", W8A8)
def test_onnxruntime_agrees_within_one_output_step(per_channel, act_symmetric):
    qm, x = _tiny(QuantConfig(8, 8, weight_per_channel=per_channel, act_symmetric=act_symmetric))
    onx = export_qdq(qm, x[:2])
    onnx.checker.check_model(onx, full_check=True)
    assert list(act_quantizers(qm))[-1] == "head"      # the logits have their own site
    d = _steps(qm, onx, x)
    assert d.max() <= TOL
    # most logits are bit-exact: a wrong scale, zero point or op would move nearly all of them
    assert (d > 0).mean() < 0.2


@pytest.fixture(scope="module")
def mnist1d_qdq():
    from refimpl.zoo import pretrained
    model, data = pretrained("mnist1d", "resnet", 0, progress=False)
    qm = quantize_model(fold_all_bn(model), QuantConfig(8, 8, weight_per_channel=True))
    calibrate(qm, data.x_calib)
    return qm, export_qdq(qm, data.x_test[:2]), data


def test_trained_mnist1d_resnet_agrees(mnist1d_qdq):
    qm, onx, data = mnist1d_qdq
    d = _steps(qm, onx, data.x_test)
    assert d.max() <= TOL
    assert (d > 0).mean() < 0.2                     # measured here: 2 of 10000 logits differ, by one step
    # onnxruntime's integer kernels (CPU-dependent, see the module docstring): the classes agree
    with torch.no_grad():
        ref = qm(data.x_test).argmax(1).numpy()
    agree = (_run(onx, data.x_test, optimize=True).argmax(1) == ref).mean()
    assert agree >= 0.95


@pytest.mark.parametrize("per_channel", [True, False])
def test_qdq_nodes_carry_the_quantizers_grids(per_channel):
    qm, x = _tiny(QuantConfig(8, 8, weight_per_channel=per_channel, act_symmetric=False))
    onx = export_qdq(qm, x[:2])
    assert onx.opset_import[0].version == ONNX_OPSET
    inits = _inits(onx)
    nodes = list(onx.graph.node)
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dqs = [n for n in nodes if n.op_type == "DequantizeLinear"]
    sites, layers = act_quantizers(qm), quant_layers(qm)
    assert len(qs) == len(sites)
    assert len(dqs) == len(sites) + len(layers)
    assert not any(n.op_type == "Clip" for n in nodes)     # 8-bit full-range grids need none
    # activation sites: in graph order, one QuantizeLinear each, read by one DequantizeLinear
    signs = set()
    for q_node, (site, aq) in zip(qs, sites.items()):
        grid = aq.export()
        scale, zp = inits[q_node.input[1]], inits[q_node.input[2]]
        assert zp.dtype == (np.int8 if aq.spec.signed else np.uint8), site
        assert scale.dtype == np.float32 and scale.shape == () and zp.shape == ()
        assert scale == grid["scale"].numpy() and int(zp) == int(grid["zero_point"]), site
        readers = [n for n in nodes if q_node.output[0] in n.input]
        assert [n.op_type for n in readers] == ["DequantizeLinear"]
        assert list(readers[0].input[1:]) == list(q_node.input[1:])
        signs.add(aq.spec.signed)
    assert signs == {True, False}          # the input is signed, the ReLU outputs unsigned
    # weights: int8 codes -> DequantizeLinear, per-channel along axis 0
    for name, layer in layers.items():
        key = name.replace(".", "_") + "_weight_codes"
        (code_name,) = [k for k in inits if k.startswith(key)]
        (dq,) = [n for n in dqs if n.input[0] == code_name]
        codes, scale, zp = inits[code_name], inits[dq.input[1]], inits[dq.input[2]]
        grid = layer.weight_quantizer.export()
        assert codes.dtype == np.int8 and zp.dtype == np.int8 and codes.shape == tuple(layer.weight.shape)
        np.testing.assert_array_equal(scale, grid["scale"].numpy())
        np.testing.assert_array_equal(zp.astype(np.int32), grid["zero_point"].numpy())
        axis = {a.name: a.i for a in dq.attribute}.get("axis")
        if per_channel:
            assert axis == 0 and scale.shape == (layer.weight.shape[0],)
            shape = (-1,) + (1,) * (codes.ndim - 1)
        else:
            assert axis is None and scale.shape == ()
            shape = ()
        w_hat = (codes.astype(np.float32) - zp.reshape(shape).astype(np.float32)) * scale.reshape(shape)
        np.testing.assert_array_equal(w_hat, layer.quantized_weight().detach().numpy())


def _without_clips(onx):
    """onx with every Clip between QuantizeLinear and DequantizeLinear bypassed."""
    m = onnx.ModelProto()
    m.CopyFrom(onx)
    q_outputs = {n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    clips = [n for n in m.graph.node if n.op_type == "Clip" and n.input[0] in q_outputs]
    for c in clips:
        for n in m.graph.node:
            for i, name in enumerate(n.input):
                if name == c.output[0]:
                    n.input[i] = c.input[0]
        m.graph.node.remove(c)
    return m, len(clips)


def test_four_bit_grids_are_clipped_to_their_range():
    qm, x = _tiny(QuantConfig(4, 4, act_symmetric=False))
    onx = export_qdq(qm, x[:2])
    inits = _inits(onx)
    clips = {n.input[0]: n for n in onx.graph.node if n.op_type == "Clip"}
    qs = [n for n in onx.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == len(act_quantizers(qm))
    for q_node, aq in zip(qs, act_quantizers(qm).values()):
        clip = clips[q_node.output[0]]                       # every 4-bit site is clipped
        assert int(inits[clip.input[1]]) == aq.spec.qmin and int(inits[clip.input[2]]) == aq.spec.qmax
        assert inits[clip.input[1]].dtype == inits[q_node.input[2]].dtype
    wide = x * 8                                              # far outside the calibrated ranges
    assert _steps(qm, onx, wide).max() <= TOL
    # the Clips matter: without them QuantizeLinear saturates at int8/uint8's limits only
    bare, n = _without_clips(onx)
    assert n == len(qs)
    assert _steps(qm, bare, wide).max() > 2


def test_weight_codes_cover_a_narrow_range_grid():
    qm, x = _tiny(QuantConfig(8, 8, weight_narrow_range=True))
    onx = export_qdq(qm, x[:2])
    inits = _inits(onx)
    codes = [v for k, v in inits.items() if "_weight_codes" in k]
    assert codes and all(c.min() >= -127 for c in codes)
    assert _steps(qm, onx, x).max() <= TOL


def test_saves_to_path(tmp_path):
    qm, x = _tiny(QuantConfig(8, 8))
    onx = export_qdq(qm, x[:2], path=tmp_path / "m.onnx")
    assert onnx.load(str(tmp_path / "m.onnx")) == onx
    with pytest.raises(TypeError, match="path"):
        export_qdq(qm, x[:2], path=3)


def test_apot_weights_are_refused_naming_the_layer():
    qm, x = _tiny(QuantConfig(4, 8, weight_quantizer="apot"))
    with pytest.raises(TypeError, match=r"weight of layer 'stem\.conv'.*'apot'.*non-uniform"):
        export_qdq(qm, x[:2])


def test_dsq_must_be_frozen_naming_the_site():
    qm, x = _tiny(QuantConfig(8, 8))
    set_trainable(qm, "dsq", weights=False)
    qm.eval()
    with pytest.raises(TypeError, match=r"activation site 'input'.*'dsq'.*freeze"):
        export_qdq(qm, x[:2])
    set_trainable(qm, "dsq", acts=False)
    with pytest.raises(TypeError, match=r"weight of layer 'stem\.conv'.*'dsq'.*freeze"):
        export_qdq(qm, x[:2])
    freeze(qm)
    assert _steps(qm, export_qdq(qm, x[:2]), x).max() <= TOL


def test_pact_weights_are_refused():
    qm, x = _tiny(QuantConfig(8, 8))
    set_trainable(qm, "pact", acts=False)
    qm.eval()
    with pytest.raises(TypeError, match=r"weight of layer 'stem\.conv'.*'pact'.*DoReFa"):
        export_qdq(qm, x[:2])


def test_unquantized_or_uncalibrated_models_are_refused():
    model = fold_all_bn(randomize_bn(ResNetCNN(1, 10, width=4, num_blocks=1)))
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match="no quantizers.*quantize_model"):
        export_qdq(torch.fx.symbolic_trace(model), x)
    with pytest.raises(TypeError, match="qmodel must be a torch.fx.GraphModule"):
        export_qdq(torch.nn.Sequential(torch.nn.Flatten()), x)
    qm, x = _tiny(QuantConfig(8, 8), calibrate_it=False)
    with pytest.raises(ValueError, match=r"activation site 'input' is not calibrated.*calibrate"):
        export_qdq(qm, x[:2])


def test_bad_inputs():
    qm, x = _tiny(QuantConfig(8, 8))
    with pytest.raises(TypeError, match="example_input"):
        export_qdq(qm, x[:2].double())
    qm.train()
    with pytest.raises(ValueError, match="training mode"):
        export_qdq(qm, x[:2])
    qm16, x = _tiny(QuantConfig(8, 8, site_act_bits={"head": 12}))
    with pytest.raises(ValueError, match=r"activation site 'head'.*12-bit"):
        export_qdq(qm16, x[:2])


class _PoolNet(torch.nn.Module):
    """Conv, functional relu, max and average pooling, torch.flatten, Linear."""

    def __init__(self, act=torch.relu):
        super().__init__()
        self.act = act
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.maxpool = torch.nn.MaxPool2d(2)
        self.avgpool = torch.nn.AvgPool2d(2)
        self.fc = torch.nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.maxpool(self.act(self.conv(x)))), 1))


def test_other_ops_mobilenet_and_pooling():
    from refimpl.models import MobileNetV2CNN
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    cases = ((fold_all_bn(randomize_bn(MobileNetV2CNN(width=8))), torch.randn(64, 1, 8, 8, generator=gen),
              {"Clip", "Conv", "Add", "GlobalAveragePool"}),           # ReLU6 -> Clip, depthwise Conv
             (_PoolNet().eval(), torch.randn(64, 1, 10, 10, generator=gen),
              {"MaxPool", "AveragePool", "Relu", "Flatten", "Gemm"}))
    for model, x, expected in cases:
        qm = quantize_model(model, QuantConfig(8, 8))
        calibrate(qm, x)
        onx = export_qdq(qm, x[:2])
        assert {n.op_type for n in onx.graph.node} >= expected
        d = _steps(qm, onx, x)
        assert d.max() <= TOL and (d > 0).mean() < 0.02


def test_unmapped_op_is_refused_naming_the_node():
    qm = quantize_model(_PoolNet(act=torch.sigmoid).eval(), QuantConfig(8, 8))
    x = torch.randn(8, 1, 10, 10)
    calibrate(qm, x)
    with pytest.raises(ValueError, match="node 'sigmoid'.*no ONNX mapping"):
        export_qdq(qm, x[:2])


def test_pot_scales_and_float_layers():
    qm, x = _tiny(QuantConfig(8, 8, pot_scale=True, keep_fp=("blocks.0.conv1",)))
    onx = export_qdq(qm, x[:2])
    inits = _inits(onx)
    scales = [v for k, v in inits.items() if "_scale_" in k]
    assert scales and all(np.all(np.frexp(s)[0] == 0.5) for s in scales)       # powers of two
    # the float layer: a float32 weight initializer read by Conv directly, no DequantizeLinear
    (w,) = [k for k in inits if k.startswith("blocks_0_conv1_weight")]
    assert inits[w].dtype == np.float32 and not any(n.op_type == "DequantizeLinear" and n.input[0] == w
                                                    for n in onx.graph.node)
    assert len([n for n in onx.graph.node if n.op_type == "QuantizeLinear"]) == len(act_quantizers(qm))
    d = _steps(qm, onx, x)
    assert d.max() <= TOL and (d > 0).mean() < 0.02


# ---- export_float: the float graph, translated by the same code ------------------------------

U32, U64 = 2.0 ** -24, 2.0 ** -53       # float32 and float64 unit roundoff


@pytest.fixture(scope="module")
def mnist1d_float():
    from refimpl.zoo import pretrained
    model, data = pretrained("mnist1d", "resnet", 0, progress=False)
    folded = fold_all_bn(model).eval()
    return folded, export_float(folded, data.x_test[:2]), data


def _ort_tensors(onx, x, names):
    """{name: float32 values} of the graph's tensors on x, computed by onnxruntime (optimisations
    off, so that every tensor exists as the graph defines it)."""
    m = copy.deepcopy(onx)
    extra = [n for n in names if n != "input"]
    m.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {"input": x, **dict(zip(extra, sess.run(extra, {"input": x})))}


def _gamma(k, u=U32):
    """Higham's gamma_k = k u / (1 - k u): a sum of k terms computed in any order, with or without
    FMA, has error <= gamma_k * sum |terms| (Higham, "Accuracy and Stability of Numerical
    Algorithms", 2002, §3.1)."""
    return k * u / (1 - k * u)


def _node_bounds(gm, onx, x):
    """onnxruntime's float32 results against the model evaluated in float64, with bounds from the
    summation lengths alone (no constant fitted to a CPU):

    * per node: each ONNX node's output (onnxruntime, optimisations off) against torch's op in
      float64 applied to onnxruntime's own input tensor x: a Conv/Gemm computed in float32 in
      any order is within gamma_K * (|W| |x| + |b|) of the exact op (K = fan-in + 1), a mean of L
      values within gamma_(L+1) * mean |x|, an Add within one rounding; Relu, Clip and Flatten are
      exact. The float64 reference adds the same with float64's unit roundoff. Yields
      (tensor name, onnxruntime's values, reference, bound).
    * end to end: a running error bound of a float32 forward pass (Higham §3.5), with the
      float64 model's activations as the exact values: a layer adds gamma_K * (|W| (|x| + e) +
      |b|) and carries its input's error e through |W|; ReLU/ReLU6 and Flatten carry it
      unchanged, an add sums the errors plus one rounding, a mean averages them. Yielded last
      as ("output", None, the float64 model's logits, bound).

    (Why float64 and not torch's float32 forward: under the book's numerics configuration
    (oneDNN off) torch convolves batches of 16 or more through NNPACK, whose fast algorithms
    are not sums of products; its error is not bounded by gamma_K. Measured here: 57 u
    relative to sum |terms| on a 3-tap Conv1d, against gamma_4 ~ 4 u.)
    """
    gm64 = copy.deepcopy(gm).double()
    modules = dict(gm64.named_modules())
    names = {}
    for node in gm64.graph.nodes:
        if node.op == "placeholder":
            names[node] = "input"
        elif node.op in ("call_module", "call_function", "call_method"):
            pattern = re.compile(rf"^{re.escape(node.name)}_\d+$")
            found = [n.output[0] for n in onx.graph.node if pattern.match(n.output[0])]
            names[node] = found[0] if found else names[node.args[0]]     # value-passing: no ONNX node
    ort_vals = {k: torch.from_numpy(v).double() for k, v in
                _ort_tensors(onx, x.numpy(), sorted(set(names.values()))).items()}
    env, err = {}, {}
    with torch.no_grad():
        for node in gm64.graph.nodes:
            if node.op == "placeholder":
                env[node], err[node] = x.double(), torch.zeros_like(x, dtype=torch.float64)
                continue
            if node.op == "output":
                out = node.args[0]
                yield "output", None, env[out].numpy(), (1 + 2.0 ** -28) * err[out].numpy()
                return
            args = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if node.op == "call_function" and len(args) == 2:             # the residual add
                env[node] = env[args[0]] + env[args[1]]
                err[node] = err[args[0]] + err[args[1]] + U32 * (env[node].abs() + err[args[0]] + err[args[1]])
                s = ort_vals[names[args[0]]] + ort_vals[names[args[1]]]
                yield names[node], ort_vals[names[node]].numpy(), s.numpy(), (U32 + U64) * s.abs().numpy()
                continue
            op, local, carry = _rounding_model(node, modules.get(node.target) if node.op == "call_module" else None)
            e = err[args[0]]
            env[node] = op(env[args[0]])
            err[node] = carry(e) + local(env[args[0]].abs() + e, U32)
            if names[node] != names[args[0]]:
                t = ort_vals[names[args[0]]]
                bound = local(t.abs(), U32) + local(t.abs(), U64)
                yield names[node], ort_vals[names[node]].numpy(), op(t).numpy(), bound.numpy()


def _rounding_model(node, m):
    """(op, local(|x|, u): the rounding bound of op on an input of magnitude |x|, carry: how an
    input error is carried to the output) of one fx node of a float64 model."""
    if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
        absm = copy.deepcopy(m)
        absm.weight.abs_()
        absw = copy.deepcopy(absm)
        absw.bias = None
        if absm.bias is not None:
            absm.bias.abs_()
        k = m.weight[0].numel() + 1
        return m, lambda a, u: _gamma(k, u) * absm(a), absw
    if isinstance(m, (torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d)):
        return m, lambda a, u: _gamma(a[0, 0].numel() + 1, u) * m(a), m
    if m is not None:                                                     # ReLU, ReLU6, Flatten, Identity
        return m, lambda a, u: torch.zeros((), dtype=torch.float64), m
    if node.op == "call_function":                                        # torch.relu, torch.flatten, ...
        def fn(t):
            return node.target(t, *node.args[1:], **node.kwargs)
    else:
        def fn(t):
            return getattr(t, node.target)(*node.args[1:], **node.kwargs)
    return fn, lambda a, u: torch.zeros((), dtype=torch.float64), fn


def test_export_float_matches_torch_within_float_rounding(mnist1d_float):
    folded, onx, data = mnist1d_float
    gen = torch.Generator().manual_seed(0)
    mobilenet = fold_all_bn(randomize_bn(MobileNetV2CNN(width=8)))        # 2-d, ReLU6 -> Clip, depthwise
    x2 = torch.randn(64, 1, 8, 8, generator=gen)
    for model, x, onx_, ops in ((folded, data.x_test, onx, {"Conv", "Relu", "Add", "GlobalAveragePool", "Gemm"}),
                                (mobilenet, x2, export_float(mobilenet, x2[:2]), {"Conv", "Clip", "Add"})):
        onnx.checker.check_model(onx_, full_check=True)
        assert {n.op_type for n in onx_.graph.node} >= ops
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onx_.graph.node)
        assert [i.name for i in onx_.graph.input] == ["input"] and [o.name for o in onx_.graph.output] == ["output"]
        assert onx_.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
        checked = 0
        for name, got, want, bound in _node_bounds(model, onx_, x):
            if name == "output":
                for optimize in (False, True):
                    out = _run(onx_, x, optimize).astype(np.float64)
                    assert out.shape == want.shape
                    assert (np.abs(out - want) <= bound).all(), (optimize, float(np.abs(out - want).max()))
            else:
                assert got.shape == want.shape, name
                assert (np.abs(got - want) <= bound).all(), (name, float(np.abs(got - want).max()))
                checked += 1
        assert checked == sum(n.op_type != "Identity" for n in onx_.graph.node)   # every node but the output's
        # and torch's own float32 forward agrees with onnxruntime's to float32 precision
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(_run(onx_, x, True) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_export_float_shares_export_qdq_translation():
    torch.manual_seed(0)
    model = fold_all_bn(randomize_bn(ResNetCNN(1, 10, width=4, num_blocks=2)))
    x = torch.randn(32, 1, 8, 8)
    qm = quantize_model(model, QuantConfig(8, 8))
    calibrate(qm, x)
    flt, qdq = export_float(model, x[:2]), export_qdq(qm, x[:2])
    # the same float ops in the same order; the QDQ graph adds only QuantizeLinear/DequantizeLinear
    assert [n.op_type for n in flt.graph.node] == [n.op_type for n in qdq.graph.node
                                                   if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]


def test_export_float_refuses_bn_quantizers_and_training_mode(tmp_path):
    model = randomize_bn(ResNetCNN(1, 10, width=4, num_blocks=1))
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"BatchNorm.*refimpl\.fold\.fold_all_bn"):
        export_float(model, x)
    folded = fold_all_bn(model)
    qm = quantize_model(folded, QuantConfig(8, 8))
    with pytest.raises(ValueError, match="quantizers.*export_qdq"):
        export_float(qm, x)
    folded.train()
    with pytest.raises(ValueError, match="training mode"):
        export_float(folded, x)
    folded.eval()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export_float("model", x)
    with pytest.raises(TypeError, match="example_input"):
        export_float(folded, x.double())
    with pytest.raises(ValueError, match=r"module '1' \(Sigmoid\) has no ONNX mapping"):
        export_float(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Sigmoid()).eval(), x)
    onx = export_float(folded, x, path=tmp_path / "f.onnx")
    assert onnx.load(str(tmp_path / "f.onnx")) == onx


def test_site_tensors_let_onnxruntime_return_a_site():
    from refimpl.deploy import ort_run, site_tensors
    qm, x = _tiny(QuantConfig())
    onx = export_qdq(qm, x[:2])
    sites = site_tensors(onx)
    assert list(sites) == [s for s, q in act_quantizers(qm).items() if q.state == "quantize"]
    got = ort_run(onx, x, optimize=False, outputs=["input", "head"])
    q = act_quantizers(qm)["input"]
    with torch.no_grad():
        np.testing.assert_array_equal(got["input"], q(x).numpy())     # same rounding of the same input
    np.testing.assert_array_equal(got["head"], ort_run(onx, x, optimize=False))
    with pytest.raises(ValueError, match="not activation sites"):
        ort_run(onx, x, outputs=["nope"])
