"""Fixed-width integer accumulation: wrap-around and saturation."""

import numpy as np
import pytest
import torch

from refimpl.quant.integer import integer_matmul, saturate_to_bits, wrap_to_bits


def test_wrap_matches_numpy_fixed_width_arithmetic():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (7, 300), generator=g, dtype=torch.int64)
    b = torch.randint(-128, 128, (300, 5), generator=g, dtype=torch.int64)
    # numpy int16 matmul wraps on overflow, product by product: an independent reference
    ref = (a.numpy().astype(np.int16) @ b.numpy().astype(np.int16)).astype(np.int64)
    assert np.array_equal(integer_matmul(a, b, acc_bits=16).numpy(), ref)
    assert torch.equal(integer_matmul(a, b, acc_bits=32), a @ b)


def test_saturation_is_sequential_and_order_dependent():
    a = torch.tensor([[127, 127, 127, -127]])
    b = torch.full((4, 1), 127)
    # 3 x 16129 saturates at 32767, then - 16129 = 16638; the exact sum is 32258
    assert int(integer_matmul(a, b, acc_bits=16, overflow="saturate")) == 32767 - 16129
    assert int(integer_matmul(a.flip(1), b, acc_bits=16, overflow="saturate")) == 2 * 16129
    assert int(integer_matmul(a, b, acc_bits=16, overflow="wrap")) == 2 * 16129


def test_helpers_and_errors():
    x = torch.tensor([32767, 32768, -32769, 70000])
    assert wrap_to_bits(x, 16).tolist() == [32767, -32768, 32767, 70000 - 65536]
    assert saturate_to_bits(x, 16).tolist() == [32767, 32767, -32768, 32767]
    with pytest.raises(TypeError, match="qa must be an integer tensor"):
        integer_matmul(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="overflow must be one of"):
        integer_matmul(torch.ones(2, 2, dtype=torch.int32), torch.ones(2, 2, dtype=torch.int32), overflow="clip")
    with pytest.raises(ValueError, match=r"\(M, K\) and \(K, N\)"):
        integer_matmul(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="acc_bits"):
        integer_matmul(torch.ones(2, 2, dtype=torch.int32), torch.ones(2, 2, dtype=torch.int32), acc_bits=64)


def test_integer_conv2d_equals_exact_float_conv_and_wraps_like_the_matmul():
    from refimpl.quant.integer import integer_conv2d

    g = torch.Generator().manual_seed(1)
    qx = torch.randint(0, 256, (2, 3, 7, 6), generator=g).to(torch.uint8)
    qw = torch.randint(-128, 128, (4, 3, 3, 3), generator=g).to(torch.int8)
    for stride, padding in ((1, 1), (2, 0), (1, 0)):
        ref = torch.nn.functional.conv2d(qx.double(), qw.double(), stride=stride, padding=padding)
        out = integer_conv2d(qx, qw, stride=stride, padding=padding)
        assert out.dtype == torch.int64 and torch.equal(out, ref.to(torch.int64))
        assert torch.equal(integer_conv2d(qx, qw, stride, padding, acc_bits=16), wrap_to_bits(out, 16))
    with pytest.raises(ValueError, match="same C"):
        integer_conv2d(qx, qw[:, :2])
    with pytest.raises(ValueError, match="does not fit"):
        integer_conv2d(qx, torch.ones(1, 3, 9, 9, dtype=torch.int8))
