"""capture_activations: outputs of named modules, batched, mode restored."""

import pytest
import torch
from torch import nn

from refimpl.capture import capture_activations, forward_hooks, run_batches
from refimpl.models import ResNetCNN


def test_captures_relu_outputs_equal_to_a_manual_forward():
    torch.manual_seed(0)
    model = ResNetCNN(width=4, num_blocks=2).train()
    x = torch.randn(10, 1, 8, 8)
    acts = capture_activations(model, x, batch_size=3)
    assert model.training                                   # mode restored
    assert list(acts)[:2] == ["stem.relu", "blocks.0.relu1"] and "head" in acts
    model.eval()
    with torch.no_grad():
        stem = model.stem(x)
        assert torch.allclose(acts["stem.relu"], stem, atol=1e-6)   # batching may change the last bit
        assert torch.allclose(acts["head"], model(x), atol=1e-6)
    assert all(v.shape[0] == 10 for v in acts.values())


def test_named_capture_and_errors():
    model = ResNetCNN(width=4, num_blocks=1)
    x = torch.randn(4, 1, 8, 8)
    assert list(capture_activations(model, x, names=["stem.bn"])) == ["stem.bn"]
    with pytest.raises(ValueError, match="modules not found"):
        capture_activations(model, x, names=["nope"])
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), shared)
    with pytest.raises(ValueError, match="more than once"):
        capture_activations(twice, torch.randn(2, 3))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        capture_activations("model", x)


def test_inputs_with_stop_and_hooks_removed():
    model = ResNetCNN(width=4, num_blocks=1)
    x = torch.randn(6, 1, 8, 8)
    full = capture_activations(model, x, names=["head"], where="input", batch_size=4)["head"]
    stopped = capture_activations(model, x, names=["head"], where="input", stop=True, batch_size=4)["head"]
    assert full.shape == (6, 4) and torch.equal(full, stopped)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="one name"):
        capture_activations(model, x, names=["head", "pool"], stop=True)
    with pytest.raises(ValueError, match="where"):
        capture_activations(model, x, names=["head"], where="both")


def test_run_batches_restores_mode_and_moves_nothing_when_no_parameters():
    model = ResNetCNN(width=4, num_blocks=1).train()
    seen = []
    with forward_hooks(model, {"head": lambda m, i, o: seen.append(o.shape[0])}):
        run_batches(model, torch.randn(5, 1, 8, 8), batch_size=2)
    assert seen == [2, 2, 1] and model.training
    run_batches(torch.nn.ReLU(), torch.randn(3, 2))
