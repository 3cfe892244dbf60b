"""refimpl.qat.mqbench: one QAT algorithm under one backend's rules (MQBench's table cell)."""
import dataclasses
import math

import pytest

from refimpl.qat import MQBENCH_ALGORITHMS, mqbench_qat, qat_kinds
from refimpl.qmodel import act_quantizers, backend_names, weight_quantizers
from refimpl.train import train_fp32


@pytest.fixture(scope="module")
def small_fp():
    """A briefly trained digits ResNet (BN in every block) and a 512-row training subset."""
    model, data = train_fp32("digits", seed=0, progress=False, epochs=4)
    return model, dataclasses.replace(data, x_train=data.x_train[:512], y_train=data.y_train[:512])


def test_every_algorithm_is_a_trainable_kind():
    assert set(MQBENCH_ALGORITHMS) == {"lsq", "pact", "dorefa", "qil", "dsq", "apot"}
    for name, algo in MQBENCH_ALGORITHMS.items():
        assert algo.kind in qat_kinds(), name
        assert algo.paper and algo.settings


@pytest.mark.parametrize("backend", ["academic", "tensorrt", "tvm", "snpe"])
@pytest.mark.parametrize("algorithm", sorted(MQBENCH_ALGORITHMS))
def test_every_cell_of_the_table_runs(small_fp, backend, algorithm):
    model, data = small_fp
    if algorithm == "apot" and backend != "academic":
        with pytest.raises(ValueError, match="non-uniform grid"):
            mqbench_qat(model, data, backend, algorithm, epochs=1, progress=False)
        return
    qm, h = mqbench_qat(model, data, backend, algorithm, 4, 4, epochs=1, progress=False, eval_each_epoch=False)
    assert h["backend"] == backend and h["algorithm"] == algorithm
    assert all(math.isfinite(v) for v in h["loss"]) and 0 <= h["final_acc"] <= 100
    # the backend's rules reach every quantizer; the first and last layers are at 8 bits
    pot = backend == "tvm"
    specs = [q.spec for q in list(weight_quantizers(qm).values()) + list(act_quantizers(qm).values())]
    assert all(s.pot_scale == pot for s in specs)
    bits = [q.spec.bits for q in weight_quantizers(qm).values()]
    assert bits[0] == bits[-1] == 8 and set(bits[1:-1]) == {4}


def test_same_seed_same_result(small_fp):
    model, data = small_fp
    a = mqbench_qat(model, data, "fbgemm", "lsq", epochs=1, seed=2, progress=False, eval_each_epoch=False)[1]
    b = mqbench_qat(model, data, "fbgemm", "lsq", epochs=1, seed=2, progress=False, eval_each_epoch=False)[1]
    assert a["loss"] == b["loss"] and a["final_acc"] == b["final_acc"]


def test_bad_names_list_the_valid_ones(small_fp):
    model, data = small_fp
    with pytest.raises(ValueError, match="algorithm must be one of 'lsq', 'pact', 'dorefa', 'qil', 'dsq', 'apot'"):
        mqbench_qat(model, data, "academic", "lsq+", epochs=1, progress=False)
    with pytest.raises(ValueError, match="backend must be one of 'academic', 'tensorrt'"):
        mqbench_qat(model, data, "tensorrt8", "lsq", epochs=1, progress=False)
    with pytest.raises(ValueError, match="which tensorrt .* cannot express"):
        mqbench_qat(model, data, "tensorrt", "apot", epochs=1, progress=False)
    assert len(backend_names()) >= 6
