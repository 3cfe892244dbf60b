"""refimpl.ptq.pipeline: the standard PTQ pipeline composes the parts as documented, and the
debugging flow's accuracies are what switching quantizers by hand gives."""
import pytest
import torch

from refimpl.fold import fold_all_bn
from refimpl.ptq import quantization_sensitivity, standard_pipeline
from refimpl.qmodel import (QuantConfig, act_quantizers, calibrate, quant_layers, quantize_model,
                            set_quant_state, weight_quantizers)
from refimpl.train import evaluate
from refimpl.zoo import pretrained


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return pretrained("digits", "resnet", seed=0)


def test_plain_pipeline_equals_insert_and_calibrate(trained):
    model, data = trained
    cfg = QuantConfig(weight_bits=6, act_bits=8, weight_per_channel=False)
    r = standard_pipeline(model, data.x_calib, cfg, cle=False, bias_absorption=False,
                          adaround=False, progress=False)
    assert r.steps == ["fold BatchNorm", "quantizers (6-bit weights, minmax ranges)",
                       "activation ranges (minmax)"]
    by_hand = quantize_model(fold_all_bn(model), cfg)
    calibrate(by_hand, data.x_calib)
    x = data.x_test[:64]
    assert torch.equal(r.qmodel(x), by_hand(x))
    # the input model is untouched: still has its BatchNorms and gives its own outputs
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_cle_and_bias_correction_steps_keep_fp32_function(trained):
    model, data = trained
    cfg = QuantConfig(weight_bits=4, act_bits=8, weight_per_channel=False)
    r = standard_pipeline(model, data.x_calib, cfg, adaround=False,
                          bias_correction="empirical", progress=False)
    assert r.steps[:3] == ["fold BatchNorm", "cross-layer equalization", "high-bias absorption"]
    assert "bias correction (empirical)" in r.steps and r.steps[-1] == "activation ranges again"
    x = data.x_test[:128]
    # the reference after folding, CLE and absorption computes the FP32 function (ResNet: ReLU only)
    torch.testing.assert_close(r.fp_model(x), model(x), rtol=1e-4, atol=1e-4)
    assert r.cle_report is not None
    r2 = standard_pipeline(model, data.x_calib, cfg, adaround=False,
                           bias_correction="analytic", progress=False)
    assert "bias correction (analytic)" in r2.steps


def test_pipeline_rejects_bad_arguments(trained):
    model, data = trained
    cfg = QuantConfig()
    with pytest.raises(TypeError, match="'rounding' is now spelled 'adaround'"):
        standard_pipeline(model, data.x_calib, cfg, rounding="nearest")
    with pytest.raises(TypeError, match="adaround must be a bool"):
        standard_pipeline(model, data.x_calib, cfg, adaround="yes")
    with pytest.raises(ValueError, match="bias_correction"):
        standard_pipeline(model, data.x_calib, cfg, bias_correction="both")
    with pytest.raises(TypeError, match="config"):
        standard_pipeline(model, data.x_calib, {"weight_bits": 8})
    with pytest.raises(ValueError, match="BatchNorm"):
        standard_pipeline(fold_all_bn(model), data.x_calib, cfg, adaround=False,
                          bias_correction="analytic")


def test_sensitivity_matches_switching_by_hand(trained):
    model, data = trained
    folded = fold_all_bn(model)
    q = quantize_model(folded, QuantConfig(weight_bits=3, act_bits=4, weight_per_channel=False))
    calibrate(q, data.x_calib)
    x, y = data.x_test, data.y_test
    rep = quantization_sensitivity(q, x, y)
    assert rep["fp32"] == evaluate(folded, x, y)              # quantizers off == FP32
    assert set(rep["layers"]) == set(quant_layers(q)) and set(rep["sites"]) == set(act_quantizers(q))
    # state restored: everything quantizes again
    assert all(w.enabled for w in weight_quantizers(q).values())
    assert all(a.state == "quantize" for a in act_quantizers(q).values())
    assert rep["full"] == evaluate(q, x, y)
    name = next(iter(rep["layers"]))
    set_quant_state(q, weights=False, acts=False)
    set_quant_state(q, weights=True, acts=False, layers=[name])
    assert rep["layers"][name] == evaluate(q, x, y)
    set_quant_state(q)
    # 3-bit per-tensor weights and 4-bit activations hurt somewhere
    assert min(rep["layers"].values()) < rep["fp32"] or rep["full"] < rep["fp32"]


def test_pipeline_accuracy_is_the_pipelines_test_accuracy(trained):
    from refimpl.ptq import pipeline_accuracy
    model, data = trained
    cfg = QuantConfig(weight_bits=5, act_bits=8)
    r = standard_pipeline(model, data.x_calib, cfg, adaround=False, progress=False)
    assert pipeline_accuracy(model, data, cfg, adaround=False) == evaluate(r.qmodel, data.x_test, data.y_test)


def test_pipeline_accuracies_equal_separate_pipelines(trained):
    from refimpl.ptq import pipeline_accuracies, pipeline_accuracy
    model, data = trained
    cfg = QuantConfig(weight_bits=4, act_bits=8, weight_per_channel=False, weight_range_method="mse")
    endings = {"nearest": {"adaround": False}, "bc": {"adaround": False, "bias_correction": "empirical"},
               "ada": {"adaround": True}}
    kw = {"adaround_kw": {"iterations": 20}}
    shared = pipeline_accuracies(model, data, cfg, endings, **kw)
    assert list(shared) == list(endings)
    for name, ending in endings.items():
        assert shared[name] == pipeline_accuracy(model, data, cfg, **ending, **kw), name
    with pytest.raises(ValueError, match="only adaround"):
        pipeline_accuracies(model, data, cfg, {"x": {"adaround": False, "cle": False}})
    with pytest.raises(ValueError, match="now spelled 'adaround'"):
        pipeline_accuracies(model, data, cfg, {"x": {"rounding": "nearest"}})
    with pytest.raises(ValueError, match="needs adaround"):
        pipeline_accuracies(model, data, cfg, {"x": {}})
