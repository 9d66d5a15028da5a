"""Tests for qmanifold.symbolic: sympy -> torch lowering."""

import math

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.codegen.cfunctions import expm1, log1p, log2

from qmanifold.symbolic import LoweredFunction, T, as_sympy, derive, lower, lower_in_t

t = T
half = sympy.Rational(1, 2)

# Expressions that are smooth and real on (0, 1) (Piecewise/Min/Max are smooth away from their kinks).
EXPRESSIONS = [
    1 - t,
    sympy.cos(sympy.pi * t / 2),
    sympy.sin(sympy.pi * t / 2) ** 3 - sympy.E * t,
    sympy.exp(-t**2) / (1 + t),
    sympy.log(t) + sympy.sqrt(t),
    sympy.tan(t) * sympy.atan(3 * t),
    sympy.tanh(5 * t - 2),
    t ** sympy.Rational(3, 2) - t ** sympy.Rational(-1, 3),
    2**t + t**t,
    sympy.Abs(t - half) + sympy.sign(t - half),
    sympy.Min(t, 1 - t, sympy.Rational(2, 5)),
    sympy.Max(t**2, sympy.Float(0.1)),
    sympy.Piecewise((t**2, t < sympy.Rational(1, 3)), (sympy.sin(t), t <= sympy.Rational(2, 3)), (1 - t, True)),
    sympy.Piecewise((sympy.exp(t), sympy.And(t > sympy.Rational(1, 4), t < half)), (sympy.cosh(t), True)),
    sympy.sqrt(-expm1(-2 * (t / 20 + 5 * (1 - t) ** 2))),
    log1p(t**2) + log2(1 + t),
    sympy.asinh(t) + sympy.acos(t) + sympy.asin(t / 2) + sympy.sinh(t) + sympy.cosh(t),
    sympy.erf(t) + sympy.atan2(t, 1 + t),
    (t * (-(80 ** sympy.Rational(1, 7)) + 20000 ** sympy.Rational(1, 7) / 10) + 80 ** sympy.Rational(1, 7)) ** 7,
    sympy.pi * t / (sympy.EulerGamma + t**2) - sympy.sqrt(2) / t,
    sympy.sec(t) + sympy.cot(t + half) + sympy.csc(t + half),
]
KINKS = [sympy.Rational(1, 3), sympy.Rational(2, 3), sympy.Rational(1, 4), half, sympy.Rational(2, 5),
         sympy.Rational(3, 5), 1 / sympy.sqrt(10)]

points = st.lists(st.floats(min_value=0.02, max_value=0.98), min_size=1, max_size=6)


def _away_from_kinks(vals, eps=1e-3):
    return [v for v in vals if all(abs(v - float(k)) > eps for k in KINKS)] or [0.1]


def _sympy_eval(expr, vals):
    return [float(sympy.N(expr.xreplace({t: sympy.Float(v, 30)}), 20)) for v in vals]


@pytest.mark.parametrize("idx", range(len(EXPRESSIONS)))
@settings(max_examples=15, deadline=None)
@given(vals=points)
def test_lowered_matches_sympy(idx, vals):
    expr = EXPRESSIONS[idx]
    vals = _away_from_kinks(vals)
    f = lower(expr, t)
    out = f(torch.tensor(vals, dtype=torch.float64))
    ref = torch.tensor(_sympy_eval(expr, vals), dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("idx", range(len(EXPRESSIONS)))
@settings(max_examples=10, deadline=None)
@given(vals=points)
def test_autograd_matches_symbolic_derivative(idx, vals):
    expr = EXPRESSIONS[idx]
    vals = _away_from_kinks(vals)
    x = torch.tensor(vals, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(lower(expr, t)(x).sum(), x)
    d = lower(derive(expr, t), t)(x.detach())
    torch.testing.assert_close(g, d, rtol=1e-9, atol=1e-9)


def test_second_derivative():
    expr = sympy.sin(3 * t) * sympy.exp(t)
    x = torch.linspace(0.1, 0.9, 7, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(lower(expr)(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, lower_in_t(expr, order=2)(x.detach()))
    assert derive(expr, t, 0) == expr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_device_and_constants(dtype):
    x = torch.linspace(0, 1, 5, dtype=dtype)
    for expr in [sympy.cos(sympy.pi * t), sympy.Integer(3), sympy.pi,
                 sympy.Piecewise((1, t < half), (2, True)), sympy.Heaviside(t - half), sympy.Min(t, half)]:
        out = lower(expr, t)(x)
        assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    torch.testing.assert_close(lower(sympy.pi, t)(x), torch.full((5,), math.pi, dtype=dtype))
    torch.testing.assert_close(lower(sympy.Piecewise((1, t < half), (2, True)), t)(x),
                               torch.tensor([1, 1, 2, 2, 2], dtype=dtype))
    torch.testing.assert_close(lower(sympy.Heaviside(t - half), t)(x),
                               torch.tensor([0, 0, 0.5, 1, 1], dtype=dtype))
    # float64 keeps full precision of folded constants
    if dtype == torch.float64:
        y = lower(sympy.sqrt(2) * t + sympy.Rational(1, 3), t)(torch.ones((), dtype=dtype))
        assert abs(float(y) - (math.sqrt(2) + 1 / 3)) < 1e-15


def test_inputs_numbers_ints_and_broadcasting():
    x, y = sympy.symbols("x y", real=True)
    f = lower(x * y + sympy.sin(x), x, y)
    a, b = torch.rand(3, 1, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    out = f(a, b)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    torch.testing.assert_close(out, a * b + torch.sin(a))
    # expression not depending on y still has the broadcast shape
    g = lower(2 * x, x, y)
    assert g(torch.ones(3, 1), torch.ones(4)).shape == (3, 4)
    # Python numbers and integer tensors
    assert torch.allclose(lower("t^2 + 1")(0.5), torch.tensor(1.25))
    assert lower(t + 1, t)(torch.arange(3)).dtype == torch.get_default_dtype()
    assert f(a, 2.0).dtype == torch.float64
    with pytest.raises(TypeError, match="expects 2 argument"):
        f(a)
    with pytest.raises(TypeError, match="tensors or real Python numbers"):
        f(a, "x")


def test_piecewise_without_fallback_is_nan_and_bool_ops():
    f = lower(sympy.Piecewise((1, t < 0), (t, t < 1)), t)
    out = f(torch.tensor([-1.0, 0.5, 2.0]))
    assert out[0] == 1 and out[1] == 0.5 and torch.isnan(out[2])
    g = lower(sympy.Piecewise((1, sympy.Or(sympy.Eq(t, 0), sympy.Not(t < 1))), (0, True)), t)
    torch.testing.assert_close(g(torch.tensor([0.0, 0.5, 1.0, 2.0])), torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_cache_and_source():
    e = sympy.cos(sympy.pi * t / 2) ** 2
    f = lower(e, t)
    assert f is lower(e, t)
    assert isinstance(f, LoweredFunction)
    assert "torch.cos" in f.source and "numpy" not in f.source and "math." not in f.source
    assert "LoweredFunction" in repr(f)


def test_torch_compile_fullgraph():
    f = lower(sympy.Piecewise((sympy.sin(t) ** 2, t < half), (sympy.exp(-t), True)) + sympy.Min(t, 0.3), t)
    g = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.rand(6, dtype=torch.float64)
    torch.testing.assert_close(g(x), f(x))


def test_as_sympy_conversions():
    assert as_sympy("1 - t") == 1 - t
    assert as_sympy("t^2") == t**2
    assert as_sympy("0.1*t") == t / 10
    assert as_sympy(sympy.Symbol("t") + 1) == t + 1  # renamed to the real time symbol
    assert as_sympy(2) == 2 and as_sympy(0.5) == sympy.Float(0.5)
    from fractions import Fraction
    assert as_sympy(Fraction(1, 3)) == sympy.Rational(1, 3)
    assert as_sympy("cos(pi*t/2)") == sympy.cos(sympy.pi * t / 2)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ("1 - s", ValueError, "free symbol"),
        (sympy.Symbol("x") * t, ValueError, "free symbol"),
        ("1 - (t", ValueError, "could not parse"),
        ("beta*2", ValueError, "could not parse"),
        (True, TypeError, "bool"),
        (float("nan"), ValueError, "finite"),
        (torch.tensor(1.0), TypeError, "torch.Tensor"),
        ([1, 2], TypeError, "expected a number"),
        ("t < 1", ValueError, "boolean"),
        ("sqrt(-1)*t", ValueError, "not real"),
    ],
)
def test_as_sympy_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        as_sympy(bad, t, name="ahat")


def test_lower_errors():
    x = sympy.Symbol("x")
    with pytest.raises(ValueError, match="free symbol"):
        lower(x + t, t)
    with pytest.raises(TypeError, match="cannot lower"):
        lower(sympy.Function("f")(t), t)
    with pytest.raises(TypeError, match="Symbols"):
        lower(t, "t")
    with pytest.raises(TypeError, match="duplicate"):
        lower(t, t, t)
    with pytest.raises(ValueError, match="non-real"):
        lower(t * sympy.sqrt(-2), t)
    with pytest.raises(ValueError, match="order"):
        derive(t, t, -1)
