"""Property tests (hypothesis) for the uniform quantizer's invariants."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.quant import QuantSpec, fake_quant, qparams, quantize

specs = st.builds(QuantSpec, bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans(),
                  narrow_range=st.booleans())
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
values = st.lists(finite, min_size=1, max_size=64)
dtypes = st.sampled_from([torch.float32, torch.float64])


def setup(spec, xs, dtype):
    x = torch.tensor(xs, dtype=dtype)
    s, z = qparams(float(x.min()), float(x.max()), spec)
    return x, s, z


@settings(max_examples=300, deadline=None)
@given(spec=specs, xs=values, dtype=dtypes)
def test_error_at_most_half_a_step_inside_the_range(spec, xs, dtype):
    x, s, z = setup(spec, xs, dtype)
    lo = float(s) * (spec.qmin - int(z))
    hi = float(s) * (spec.qmax - int(z))
    inside = (x.double() >= lo) & (x.double() <= hi)
    err = (fake_quant(x, s, z, spec).double() - x.double()).abs()[inside]
    # half a step, plus the float32 rounding of x/s and of the grid point
    bound = float(s) / 2 + 4e-7 * (x.double().abs().max() + float(s))
    assert bool((err <= bound).all())


@settings(max_examples=300, deadline=None)
@given(spec=specs, xs=values, dtype=dtypes)
def test_idempotent(spec, xs, dtype):
    x, s, z = setup(spec, xs, dtype)
    y = fake_quant(x, s, z, spec)
    assert torch.equal(fake_quant(y, s, z, spec), y)


@settings(max_examples=300, deadline=None)
@given(spec=specs, xs=values, dtype=dtypes)
def test_monotone(spec, xs, dtype):
    x, s, z = setup(spec, xs, dtype)
    x = torch.sort(x).values
    assert bool((torch.diff(fake_quant(x, s, z, spec)) >= 0).all())
    assert bool((torch.diff(quantize(x, s, z, spec).long()) >= 0).all())


@settings(max_examples=300, deadline=None)
@given(spec=specs, xs=values, dtype=dtypes)
def test_zero_is_exact(spec, xs, dtype):
    x, s, z = setup(spec, xs, dtype)
    zero = torch.zeros(1, dtype=dtype)
    assert float(fake_quant(zero, s, z, spec)) == 0.0
    assert int(quantize(zero, s, z, spec)) == int(z)
