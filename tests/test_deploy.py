"""refimpl.deploy: a conv's integer GEMM operands against PyTorch's conv and quantized conv."""
import numpy as np
import pytest
import torch

from refimpl.deploy import integer_conv_operands, torch_integer_conv, torch_quantized_conv
from refimpl.quant.integer import im2col, integer_conv2d


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    x = torch.randn(3, 16, 7, 7, generator=g)     # signed input: both signs of codes
    return conv, x


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, 1)])
def test_gemm_operands_reproduce_the_convolution(stride, padding):
    g = torch.Generator().manual_seed(stride * 10 + padding)
    conv = torch.nn.Conv2d(5, 4, 3, stride=stride, padding=padding, bias=False)
    x = torch.randn(2, 5, 9, 9, generator=g)
    op = integer_conv_operands(conv, x)
    assert op.a_codes.dtype == np.int8 and op.w_codes.dtype == np.int8
    assert op.a_codes.shape == (op.out_shape[0] * op.out_shape[2] * op.out_shape[3], 45)
    acc = op.a_codes.astype(np.int64) @ op.w_codes.astype(np.int64)
    ref = torch_integer_conv(op)
    np.testing.assert_array_equal(op.to_nchw(acc), ref)
    np.testing.assert_array_equal(
        integer_conv2d(op.x_codes, op.w_codes_oihw, stride, padding).numpy(), ref)
    # weights are narrow range (no -128) and the codes dequantize close to the real tensors
    assert op.w_codes.min() >= -127
    w_hat = op.w_codes_oihw.double() * torch.as_tensor(op.weight_scale)[:, None, None, None]
    assert (w_hat - conv.weight.double()).abs().max() <= op.weight_scale.max() / 2 + 1e-7


def test_quantized_conv_matches_exact_requantization(layer):
    conv, x = layer
    op = integer_conv_operands(conv, x)
    acc = torch_integer_conv(op)
    out_scale = float(np.abs(acc * op.real_scale(1.0)[None, :, None, None]).max() / 100)
    exact = np.clip(np.round(acc * op.real_scale(out_scale)[None, :, None, None]) + 3, -128, 127)
    got = torch_quantized_conv(op, out_scale, out_zero_point=3)
    # PyTorch requantizes in float32: at most one code away, and rarely
    assert np.abs(got - exact).max() <= 1
    assert (got != exact).mean() < 0.01


def test_im2col_rows_and_columns():
    qx = torch.arange(2 * 3 * 4 * 4, dtype=torch.int64).reshape(2, 3, 4, 4)
    cols = im2col(qx, (2, 2), stride=2)
    assert cols.shape == (2 * 2 * 2, 3 * 4)
    # row (n=1, h=0, w=1), column (c=2, i=1, j=0)
    assert cols[1 * 4 + 0 * 2 + 1, 2 * 4 + 1 * 2 + 0] == qx[1, 2, 1, 2]
    with pytest.raises(TypeError, match="kernel_size"):
        im2col(qx, 3)
    with pytest.raises(ValueError, match="does not fit"):
        im2col(qx, (5, 5))


def test_bad_input():
    conv = torch.nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=1"):
        integer_conv_operands(conv, torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="x must be"):
        integer_conv_operands(torch.nn.Conv2d(4, 4, 3), torch.randn(1, 3, 5, 5))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        integer_conv_operands(torch.nn.Linear(4, 4), torch.randn(1, 4, 5, 5))
    op = integer_conv_operands(torch.nn.Conv2d(4, 4, 3), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="out_scale"):
        torch_quantized_conv(op, 0.0)
    with pytest.raises(ValueError, match="engine"):
        torch_quantized_conv(op, 1.0, engine="tpu")
    with pytest.raises(ValueError, match="gemm_out"):
        op.to_nchw(np.zeros((3, 3)))
