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

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from refimpl.deploy import ONNX_OPSET, export_qdq
from refimpl.fold import fold_all_bn
from refimpl.models import ResNetCNN
from refimpl.qmodel import (QuantConfig, act_quantizers, calibrate, freeze, quant_layers, quantize_model,
                            set_trainable)

TOL = 1 + 1e-5      # a difference of k steps is k * scale in float32: allow its rounding


def _randomize_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _tiny(config, calibrate_it=True, seed=0):
    torch.manual_seed(seed)
    model = _randomize_bn(ResNetCNN(1, 10, width=4, num_blocks=2), seed)
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
    model = fold_all_bn(_randomize_bn(ResNetCNN(1, 10, width=4, num_blocks=1)))
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
    cases = ((fold_all_bn(_randomize_bn(MobileNetV2CNN(width=8))), torch.randn(64, 1, 8, 8, generator=gen),
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
