"""Lowering of scalar sympy expressions to element-wise torch functions.

Schedules, interpolants and loss weights in qmanifold are written once as
symbolic expressions in the time variable ``t`` (see :mod:`qmanifold.schedules`)
so that their derivatives can be taken exactly by :func:`sympy.diff`.  This
module turns such expressions into plain torch functions:

>>> import sympy, torch
>>> f = lower(sympy.cos(sympy.pi * T / 2), T)
>>> f(torch.tensor([0.0, 1.0], dtype=torch.float64))      # doctest: +SKIP
tensor([1.0000e+00, 6.1232e-17], dtype=torch.float64)

Design
------
* The expression tree is walked by a small code generator (no
  :func:`sympy.lambdify`, hence no numpy / math fallbacks): every node is
  emitted as a torch call, after common-subexpression elimination
  (:func:`sympy.cse`).  The generated source is kept on the returned function
  (``f.source``) and registered with :mod:`linecache` for readable tracebacks.
* Sub-expressions without free symbols (``pi``, ``sqrt(2)``, ``80**(1/7)``,
  ``Rational(1, 3)``, ...) are folded to Python floats at lowering time
  (evaluated by sympy with 30 significant digits).  A Python float combined
  with a tensor adopts the tensor's dtype and device, so no host->device copy
  happens.  Where an op needs a tensor constant (both branches of a
  ``Piecewise`` constant, a constant expression, ``Heaviside``) it is
  materialised with ``torch.full`` in the inputs' dtype and device.
* Inputs broadcast against each other with the usual torch rules; the result
  always has the broadcast shape of *all* inputs (even of inputs the
  expression does not depend on).  Python numbers are accepted and converted
  to the promoted floating dtype / device of the tensor inputs; integer or
  bool tensors are promoted to the default floating dtype (as ``torch.sin``
  does).
* The generated code contains only torch ops: no ``.item()``, no host syncs,
  no data-dependent Python branches.  It is differentiable by autograd and
  traceable by ``torch.compile(fullgraph=True)``.  ``Piecewise`` becomes nested
  ``torch.where``; as usual with ``where``, a NaN/inf gradient of the branch
  that is *not* selected still poisons the gradient (``0 * inf``), so write
  branches that are finite on the whole domain.
* Lowered functions are cached on ``(expr, symbols)``.

Supported nodes: ``Add``, ``Mul`` (numerator / denominator split, so ``a/b``
is one division), ``Pow`` (``sqrt``/``rsqrt``/``square``/``reciprocal``
special cases), ``exp, log, sin, cos, tan, cot, sec, csc, asin, acos, atan,
atan2, sinh, cosh, tanh, asinh, acosh, atanh, sqrt, Abs, sign, floor,
ceiling, erf, erfc, erfinv, loggamma, Heaviside, DiracDelta (0 away from the
origin, ``inf`` at it; appears in derivatives of ``sign``/``Heaviside``/``Min``/``Max``),
Min, Max, Piecewise`` with
relational (``<, <=, >, >=, Eq, Ne``) and boolean (``And, Or, Not, Xor``)
conditions, the C-functions ``expm1, log1p, exp2, log2, log10`` from
:mod:`sympy.codegen.cfunctions`, and the numbers ``Integer, Rational, Float,
pi, E, EulerGamma, oo, nan``.  Anything else raises :class:`TypeError` naming
the node.

References: SymPy code printers (``sympy.printing.pycode``) for the general
approach; ``torch.where`` gradient caveat: PyTorch docs, "torch.where".
"""

from __future__ import annotations

import functools
import itertools
import linecache
import math
import numbers
from fractions import Fraction
from typing import Any

import sympy
import torch
from sympy.codegen import cfunctions

__all__ = ["T", "lower", "derive", "as_sympy", "lower_in_t", "LoweredFunction"]

#: The canonical time symbol used across qmanifold (real-valued).
T = sympy.Symbol("t", real=True)

_FOLD_DIGITS = 30

# One-argument functions mapped to a torch callable name (in the generated
# code's namespace).
_UNARY: dict[Any, str] = {
    sympy.exp: "torch.exp",
    sympy.log: "torch.log",
    sympy.sin: "torch.sin",
    sympy.cos: "torch.cos",
    sympy.tan: "torch.tan",
    sympy.asin: "torch.asin",
    sympy.acos: "torch.acos",
    sympy.atan: "torch.atan",
    sympy.sinh: "torch.sinh",
    sympy.cosh: "torch.cosh",
    sympy.tanh: "torch.tanh",
    sympy.asinh: "torch.asinh",
    sympy.acosh: "torch.acosh",
    sympy.atanh: "torch.atanh",
    sympy.Abs: "torch.abs",
    sympy.sign: "torch.sign",
    sympy.floor: "torch.floor",
    sympy.ceiling: "torch.ceil",
    sympy.erf: "torch.special.erf",
    sympy.erfc: "torch.special.erfc",
    sympy.erfinv: "torch.special.erfinv",
    sympy.loggamma: "torch.lgamma",
    cfunctions.expm1: "torch.expm1",
    cfunctions.log1p: "torch.log1p",
    cfunctions.exp2: "torch.exp2",
    cfunctions.log2: "torch.log2",
    cfunctions.log10: "torch.log10",
    sympy.cot: "_cot",
    sympy.sec: "_sec",
    sympy.csc: "_csc",
}

_RELATIONAL: dict[Any, str] = {
    sympy.StrictLessThan: "<",
    sympy.LessThan: "<=",
    sympy.StrictGreaterThan: ">",
    sympy.GreaterThan: ">=",
    sympy.Equality: "==",
    sympy.Unequality: "!=",
}


def _cot(x: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(torch.tan(x))


def _sec(x: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(torch.cos(x))


def _csc(x: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(torch.sin(x))


def _const_value(node: sympy.Basic) -> float | bool:
    """Evaluate a symbol-free node to a Python float (or bool for booleans)."""
    if node is sympy.true or node is sympy.false:
        return bool(node)
    if isinstance(node, sympy.logic.boolalg.Boolean):
        raise TypeError(f"cannot lower constant boolean expression {node!r}")
    val = sympy.N(node, _FOLD_DIGITS)
    if val is sympy.nan:
        return float("nan")
    if val in (sympy.oo, -sympy.oo):
        return float(val)
    if val is sympy.zoo or not val.is_real:
        if val.is_real is None and val.is_number and abs(sympy.im(val)) == 0:
            return float(sympy.re(val))
        raise ValueError(f"constant sub-expression {node} evaluates to the non-real value {val}")
    return float(val)


class _Gen:
    """Code generator: maps sympy nodes to ('const', float) or ('tensor', code)."""

    def __init__(self, names: dict[sympy.Symbol, str], variable_syms: set[sympy.Symbol]):
        self.names = dict(names)  # symbol -> python identifier (inputs and cse temporaries)
        self.kinds: dict[sympy.Symbol, tuple[str, Any]] = {}
        self.variable_syms = set(variable_syms)  # symbols whose value is a tensor

    # -- helpers ---------------------------------------------------------
    @staticmethod
    def _c(v: float) -> str:
        v = float(v)
        if not math.isfinite(v):
            return f"float({str(v)!r})"
        return repr(v)

    def _K(self, v: float) -> str:
        return f"_K({self._c(v)}, _dt, _dev)"

    def _tensor(self, item: tuple[str, Any]) -> str:
        kind, val = item
        return self._K(val) if kind == "const" else val

    def _scalar_or_code(self, item: tuple[str, Any]) -> str:
        kind, val = item
        return self._c(val) if kind == "const" else val

    # -- main dispatch ---------------------------------------------------
    def emit(self, node: sympy.Basic) -> tuple[str, Any]:
        if isinstance(node, sympy.Symbol):
            if node in self.kinds:
                return self.kinds[node]
            if node in self.names:
                return ("tensor", self.names[node])
            raise ValueError(f"unexpected free symbol {node}")
        if not (node.free_symbols & self.variable_syms):
            return ("const", _const_value(node))
        func = node.func
        if func is sympy.Add:
            return self._add(node)
        if func is sympy.Mul:
            return self._mul(node)
        if func is sympy.Pow:
            return self._pow(node)
        if func is sympy.Piecewise:
            return self._piecewise(node)
        if func in _UNARY:
            if len(node.args) != 1:
                raise TypeError(f"{func.__name__} with {len(node.args)} arguments is not supported")
            (a,) = node.args
            return ("tensor", f"{_UNARY[func]}({self._tensor(self.emit(a))})")
        if func is sympy.atan2:
            y, x = (self._tensor(self.emit(a)) for a in node.args)
            return ("tensor", f"torch.atan2({y}, {x})")
        if func in (sympy.Min, sympy.Max):
            return self._minmax(node)
        if func is sympy.Heaviside:
            x = self._tensor(self.emit(node.args[0]))
            h0 = _const_value(node.args[1]) if len(node.args) > 1 else 0.5
            return ("tensor", f"_heaviside({x}, {self._c(h0)}, _dt, _dev)")
        if func is sympy.DiracDelta:
            # distribution: 0 away from the origin (matching autograd of sign/Heaviside), inf at it
            x = self._tensor(self.emit(node.args[0]))
            return ("tensor", f"torch.where({x} == 0, float('inf'), 0.0 * {x})")
        if func in _RELATIONAL:
            lhs, rhs = (self._scalar_or_code(self.emit(a)) for a in node.args)
            return ("tensor", f"({lhs} {_RELATIONAL[func]} {rhs})")
        if func in (sympy.And, sympy.Or, sympy.Xor):
            op = {sympy.And: "torch.logical_and", sympy.Or: "torch.logical_or", sympy.Xor: "torch.logical_xor"}[func]
            codes = [self._bool(self.emit(a)) for a in node.args]
            return ("tensor", functools.reduce(lambda a, b: f"{op}({a}, {b})", codes))
        if func is sympy.Not:
            return ("tensor", f"torch.logical_not({self._bool(self.emit(node.args[0]))})")
        name = getattr(func, "__name__", repr(func))
        raise TypeError(f"cannot lower sympy node {name!r} (in {node}); supported: Add, Mul, Pow, Piecewise, "
                        f"Min, Max, Heaviside, DiracDelta, atan2, relationals, And/Or/Not/Xor, "
                        + ", ".join(sorted(getattr(f, "__name__", str(f)) for f in _UNARY)))

    def _bool(self, item: tuple[str, Any]) -> str:
        kind, val = item
        if kind == "const":
            return f"_KB({bool(val)!r}, _dev)"
        return val

    def _add(self, node: sympy.Basic) -> tuple[str, Any]:
        const = 0.0
        codes = []
        for a in node.args:
            kind, val = self.emit(a)
            if kind == "const":
                const += val
            else:
                codes.append(val)
        if const != 0.0:
            codes.append(self._c(const))
        return ("tensor", "(" + " + ".join(codes) + ")")

    def _mul(self, node: sympy.Basic) -> tuple[str, Any]:
        coeff = 1.0
        num: list[str] = []
        den: list[str] = []
        for a in node.args:
            if (
                a.func is sympy.Pow
                and a.args[1].is_number
                and a.args[1].is_negative
                and (a.args[0].free_symbols & self.variable_syms)
            ):
                den.append(self._tensor(self.emit(sympy.Pow(a.args[0], -a.args[1]))))
                continue
            kind, val = self.emit(a)
            if kind == "const":
                coeff *= val
            else:
                num.append(val)
        if num:
            code = " * ".join(num)
            if coeff == -1.0:
                code = f"-({code})"
            elif coeff != 1.0:
                code = f"{self._c(coeff)} * {code}"
        else:
            code = self._c(coeff)
        if den:
            code = f"({code}) / ({' * '.join(den)})"
        elif num:
            code = f"({code})"
        else:  # pragma: no cover - a symbol-dependent Mul has a tensor factor
            code = self._K(coeff)
        return ("tensor", code)

    def _pow(self, node: sympy.Basic) -> tuple[str, Any]:
        base, exp = node.args
        bkind, bval = self.emit(base)
        ekind, eval_ = self.emit(exp)
        if ekind == "const":
            e = eval_
            b = bval  # base is a tensor here (node depends on a variable)
            if e == 0.5:
                return ("tensor", f"torch.sqrt({b})")
            if e == -0.5:
                return ("tensor", f"torch.rsqrt({b})")
            if e == 1.0:
                return ("tensor", b)
            if e == 2.0:
                return ("tensor", f"torch.square({b})")
            if e == -1.0:
                return ("tensor", f"torch.reciprocal({b})")
            if e < 0:
                inner = self._pow(sympy.Pow(base, -exp, evaluate=False))[1]
                return ("tensor", f"torch.reciprocal({inner})")
            if float(e).is_integer():
                return ("tensor", f"torch.pow({b}, {int(e)})")
            return ("tensor", f"torch.pow({b}, {self._c(e)})")
        if bkind == "const":
            return ("tensor", f"torch.pow({self._c(bval)}, {eval_})")
        return ("tensor", f"torch.pow({bval}, {eval_})")

    def _minmax(self, node: sympy.Basic) -> tuple[str, Any]:
        is_min = node.func is sympy.Min
        const: float | None = None
        codes = []
        for a in node.args:
            kind, val = self.emit(a)
            if kind == "const":
                const = val if const is None else (min(const, val) if is_min else max(const, val))
            else:
                codes.append(val)
        op = "torch.minimum" if is_min else "torch.maximum"
        code = functools.reduce(lambda a, b: f"{op}({a}, {b})", codes)
        if const is not None:
            code = f"torch.clamp({code}, {'max' if is_min else 'min'}={self._c(const)})"
        return ("tensor", code)

    def _piecewise(self, node: sympy.Basic) -> tuple[str, Any]:
        pieces = list(node.args)
        # Fallback when no condition holds: sympy leaves the value undefined -> NaN.
        code: tuple[str, Any] = ("const", float("nan"))
        for expr, cond in reversed(pieces):
            val = self.emit(expr)
            if cond is sympy.true:
                code = val
                continue
            if cond is sympy.false:
                continue
            c = self._bool(self.emit(cond))
            a, b = val, code
            if a[0] == "const" and b[0] == "const":
                a_code, b_code = self._K(a[1]), self._scalar_or_code(b)
            else:
                a_code, b_code = self._scalar_or_code(a), self._scalar_or_code(b)
            code = ("tensor", f"torch.where({c}, {a_code}, {b_code})")
        return code


def _K(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Materialise a constant as a 0-dim tensor (a fill kernel, no H2D copy)."""
    return torch.full((), value, dtype=dtype, device=device)


def _KB(value: bool, device: torch.device) -> torch.Tensor:
    return torch.full((), value, dtype=torch.bool, device=device)


def _heaviside(x: torch.Tensor, h0: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    one, zero, half = _K(1.0, dtype, device), _K(0.0, dtype, device), _K(h0, dtype, device)
    return torch.where(x > 0, one, torch.where(x < 0, zero, half))


def _prepare(args: tuple, n: int) -> tuple[tuple[torch.Tensor, ...], torch.dtype, torch.device]:
    """Convert the inputs of a lowered function to floating tensors on one device."""
    if len(args) != n:
        raise TypeError(f"lowered function expects {n} argument(s), got {len(args)}")
    dtype = None
    device = None
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_complex():
                raise TypeError("lowered functions take real tensors, got a complex tensor")
            d = a.dtype if a.is_floating_point() else torch.get_default_dtype()
            dtype = d if dtype is None else torch.promote_types(dtype, d)
            if device is None:
                device = a.device
        elif isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise TypeError(f"lowered functions take tensors or real Python numbers, got {type(a).__name__}")
    if dtype is None:
        dtype = torch.get_default_dtype()
        device = torch.device("cpu")
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.dtype != dtype:
                a = a.to(dtype)
        else:
            a = torch.full((), float(a), dtype=dtype, device=device)
        out.append(a)
    return tuple(out), dtype, device


class LoweredFunction:
    """A sympy expression compiled to an element-wise torch function.

    Call with one tensor (or Python number) per symbol, in the order given to
    :func:`lower`; returns a tensor of the broadcast shape of all inputs, in
    their promoted floating dtype, on their device.

    Attributes:
        expr: the sympy expression.
        symbols: the argument symbols, in call order.
        source: the generated Python source.
        fn: the raw generated function ``fn(*tensors, _dt, _dev)`` (no input
            conversion; for advanced use).
    """

    __slots__ = ("__weakref__", "_depends_on_all", "expr", "fn", "source", "symbols")

    def __init__(self, expr, symbols, source, fn, depends_on_all):
        self.expr = expr
        self.symbols = symbols
        self.source = source
        self.fn = fn
        self._depends_on_all = depends_on_all

    def __call__(self, *args: torch.Tensor | float) -> torch.Tensor:
        tensors, dtype, device = _prepare(args, len(self.symbols))
        out = self.fn(*tensors, dtype, device)
        if not self._depends_on_all:
            shape = torch.broadcast_shapes(*(a.shape for a in tensors))
            if out.shape != shape:
                out = out.expand(shape).contiguous()
        return out

    def __repr__(self) -> str:
        args = ", ".join(str(s) for s in self.symbols)
        return f"LoweredFunction(({args}) -> {self.expr})"


_counter = itertools.count()


@functools.lru_cache(maxsize=1024)
def _lower_cached(expr: sympy.Basic, symbols: tuple[sympy.Symbol, ...]) -> LoweredFunction:
    arg_names = {s: f"a{i}" for i, s in enumerate(symbols)}
    tmp_syms = sympy.numbered_symbols("_qm_cse_", cls=sympy.Dummy)
    replacements, reduced = sympy.cse([expr], symbols=tmp_syms, optimizations=None)
    gen = _Gen(arg_names, set(symbols))
    lines = []
    const_subs: dict[sympy.Symbol, sympy.Basic] = {}  # symbol-free cse temporaries, inlined
    for k, (sym, sub) in enumerate(replacements):
        sub = sub.xreplace(const_subs)
        if not (sub.free_symbols & gen.variable_syms):
            const_subs[sym] = sub
            continue
        item = gen.emit(sub)
        name = f"c{k}"
        lines.append(f"    {name} = {item[1]}")
        gen.kinds[sym] = ("tensor", name)
        gen.variable_syms.add(sym)
    kind, val = gen.emit(reduced[0].xreplace(const_subs))
    if kind == "const":
        if isinstance(val, bool):
            raise TypeError(f"cannot lower the constant boolean {expr}")
        shape = " , ".join(f"a{i}.shape" for i in range(len(symbols)))
        lines.append(f"    return torch.full(torch.broadcast_shapes({shape}), {gen._c(val)}, dtype=_dt, device=_dev)")
    else:
        lines.append(f"    return {val}")
    idx = next(_counter)
    params = ", ".join([*(f"a{i}" for i in range(len(symbols))), "_dt", "_dev"])
    src = f"def _lowered_{idx}({params}):\n" + "\n".join(lines) + "\n"
    filename = f"<qmanifold.symbolic.lower#{idx}: {str(expr)[:80]}>"
    namespace = {"torch": torch, "_K": _K, "_KB": _KB, "_heaviside": _heaviside,
                 "_cot": _cot, "_sec": _sec, "_csc": _csc}
    exec(compile(src, filename, "exec"), namespace)  # noqa: S102 - source generated above
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    fn = namespace[f"_lowered_{idx}"]
    depends_on_all = kind != "const" and set(symbols) <= expr.free_symbols
    return LoweredFunction(expr, symbols, src, fn, depends_on_all)


def lower(expr: sympy.Basic | str | float, *symbols: sympy.Symbol) -> LoweredFunction:
    """Lower a scalar sympy expression to an element-wise torch function.

    Args:
        expr: sympy expression (numbers and strings are sympified; in strings
            the names of ``symbols`` refer to those symbols).
        *symbols: the argument symbols, in call order.  Defaults to ``(T,)``.
            Every free symbol of ``expr`` must be listed.

    Returns:
        :class:`LoweredFunction` ``f`` with ``f(x1, ..., xk)`` evaluating
        ``expr`` element-wise on broadcast tensors (shape: broadcast of the
        inputs; dtype: their promoted floating dtype; device: theirs).
        Differentiable by autograd; cached on ``(expr, symbols)``.

    Raises:
        ValueError: free symbols of ``expr`` missing from ``symbols``, or a
            constant sub-expression that is not real.
        TypeError: non-Symbol / duplicate ``symbols`` or an unsupported node.
    """
    if not symbols:
        symbols = (T,)
    for s in symbols:
        if not isinstance(s, sympy.Symbol):
            raise TypeError(f"lower(): symbols must be sympy Symbols, got {s!r} ({type(s).__name__})")
    if len(set(symbols)) != len(symbols):
        raise TypeError(f"lower(): duplicate symbols in {symbols}")
    if isinstance(expr, str):
        expr = _parse(expr, {s.name: s for s in symbols})
    elif not isinstance(expr, sympy.Basic):
        expr = _number_to_sympy(expr)
    extra = expr.free_symbols - set(symbols)
    if extra:
        raise ValueError(
            f"lower(): expression {expr} has free symbol(s) {sorted(map(str, extra))} "
            f"not among the arguments {[str(s) for s in symbols]}"
        )
    return _lower_cached(expr, tuple(symbols))


def _number_to_sympy(x: Any) -> sympy.Expr:
    if isinstance(x, bool):
        raise TypeError("expected a number, sympy expression or string, got a bool")
    if isinstance(x, (int, Fraction)):
        return sympy.Rational(x.numerator, x.denominator) if isinstance(x, Fraction) else sympy.Integer(x)
    if isinstance(x, numbers.Real):
        xf = float(x)
        if not math.isfinite(xf):
            raise ValueError(f"expected a finite number, got {x!r}")
        return sympy.Float(xf) if not xf.is_integer() else sympy.Integer(int(xf))
    raise TypeError(f"expected a number, sympy expression or string, got {type(x).__name__}")


def _parse(s: str, local: dict[str, Any]) -> sympy.Expr:
    try:
        expr = sympy.sympify(s, locals=dict(local), convert_xor=True, rational=True)
    except Exception as exc:  # noqa: BLE001 - sympify evaluates the text: SympifyError, SyntaxError, TokenError, ...
        raise ValueError(f"could not parse {s!r} as a sympy expression: {exc}") from None
    if not isinstance(expr, sympy.Basic) or isinstance(expr, type):
        raise ValueError(  # noqa: TRY004 - a bad value of the user's expression
            f"{s!r} does not parse to a sympy expression (got {expr!r})")
    return expr


def as_sympy(x: Any, t: sympy.Symbol = T, *, name: str = "expression",
             extra_locals: dict[str, Any] | None = None) -> sympy.Expr:
    """Convert ``x`` to a real scalar sympy expression whose only free symbol is ``t``.

    Args:
        x: a Python/numpy real number, a :class:`fractions.Fraction`, a sympy
            expression, or a string parsed by :func:`sympy.sympify` (``^`` means
            power; decimals become exact rationals, e.g. ``"0.1*t"`` is
            ``t/10``).  A symbol *named* like ``t`` but with other assumptions
            (e.g. ``sympy.Symbol("t")``) is replaced by ``t``.  NOTE: strings
            go through ``eval`` inside sympy; do not pass untrusted input.
        t: the time symbol (default :data:`T`).
        name: what ``x`` is, for error messages (e.g. ``"ahat"``).
        extra_locals: extra names available when parsing strings (e.g. the
            schedule expressions ``ahat``, ``beta`` for loss weights).

    Returns:
        sympy expression in ``t`` (possibly constant).

    Raises:
        ValueError: unparsable string, non-finite number, free symbols other
            than ``t``, or a boolean/relational expression.
        TypeError: unsupported type (e.g. bool, tensor, list).
    """
    if isinstance(x, sympy.Basic):
        expr = x
    elif isinstance(x, str):
        local = {t.name: t}
        if extra_locals:
            local.update(extra_locals)
        expr = _parse(x, local)
    elif isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a number, sympy expression or string, got a torch.Tensor "
                        "(pass a Python number instead)")
    else:
        try:
            expr = _number_to_sympy(x)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
    if isinstance(expr, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction,
                         sympy.logic.boolalg.BooleanAtom)):
        raise ValueError(  # noqa: TRY004 - a bad value of the user's expression
            f"{name}: expected a scalar expression, got the boolean/relational {expr}")
    if not isinstance(expr, sympy.Expr):
        raise ValueError(  # noqa: TRY004 - a bad value of the user's expression
            f"{name}: expected a scalar sympy expression, got {expr!r} ({type(expr).__name__})")
    renames = {s: t for s in expr.free_symbols if isinstance(s, sympy.Symbol) and s.name == t.name and s != t}
    if renames:
        expr = expr.xreplace(renames)
    extra = expr.free_symbols - {t}
    if extra:
        raise ValueError(f"{name}: expression {expr} may only depend on {t}, but has free symbol(s) "
                         f"{sorted(map(str, extra))}")
    if expr.has(sympy.I) or expr.has(sympy.zoo):
        raise ValueError(f"{name}: expression {expr} is not real-valued")
    return expr


def derive(expr: Any, t: sympy.Symbol = T, order: int = 1) -> sympy.Expr:
    """Exact ``order``-th derivative ``d^order expr / dt^order`` (a sympy expression).

    ``expr`` is converted with :func:`as_sympy` first.  ``order = 0`` returns
    the expression itself.  Lower the result with ``lower(derive(e), T)`` or
    :func:`lower_in_t`.
    """
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 0:
        raise ValueError(f"derive(): order must be a non-negative integer, got {order!r}")
    e = as_sympy(expr, t)
    return e if order == 0 else sympy.diff(e, t, int(order))


def lower_in_t(x: Any, order: int = 0) -> LoweredFunction:
    """Shorthand ``lower(derive(as_sympy(x), T, order), T)``."""
    return lower(derive(x, T, order), T)
