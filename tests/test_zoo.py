"""refimpl.zoo.pretrained: the memoized model is exactly what train_fp32 gives."""
import pytest
import torch

from refimpl import zoo
from refimpl.train import train_fp32


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path))
    return tmp_path


def test_cached_equals_fresh_training(cache):
    torch.set_num_threads(1)
    m1, d1 = zoo.pretrained("digits", "resnet", seed=3)        # trains and stores
    files = list(cache.glob("digits-resnet-3-*.pt"))
    assert len(files) == 1
    m2, d2 = zoo.pretrained("digits", "resnet", seed=3)        # loads
    m3, _ = train_fp32("digits", seed=3, progress=False)       # independent fresh training
    for k, v in m3.state_dict().items():
        assert torch.equal(m1.state_dict()[k], v) and torch.equal(m2.state_dict()[k], v), k
    assert torch.equal(d1.x_test, d2.x_test) and torch.equal(d1.y_train, d2.y_train)
    assert d2.input_shape == d1.input_shape and not m2.training
    x = d1.x_test[:16]
    assert torch.equal(m2(x), m3(x))


def test_corrupt_cache_file_is_retrained(cache):
    torch.set_num_threads(1)
    key = zoo.cache_key("digits", "resnet", 4)
    path = cache / f"digits-resnet-4-{key}.pt"
    path.write_bytes(b"not a checkpoint")
    m, _ = zoo.pretrained("digits", "resnet", seed=4)
    assert path.stat().st_size > 1000 and not m.training


def test_key_depends_on_arguments():
    keys = {zoo.cache_key(d, a, s) for d in ("digits", "mnist1d") for a in ("resnet", "mobilenetv2")
            for s in (0, 1)}
    assert len(keys) == 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset_name"):
        zoo.pretrained("cifar")
    with pytest.raises(ValueError, match="arch"):
        zoo.pretrained("digits", "vgg")
