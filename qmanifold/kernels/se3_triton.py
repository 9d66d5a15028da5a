"""Fused SO(3) / SE(3) quotient kernel (Triton), one pass over the data.

One kernel, specialised at compile time by ``MODE``, does every hot quotient operation on a block
of configurations:

======  =====================================================================================
MODE    output
======  =====================================================================================
0       ``out = centre(u)`` (translations only)
1       ``out = P_x(u)``
2       ``out = h(x)``
3       ``out = P_x(u)``, ``out2 = h(x)``
4       ``out = x + P_x(a u + s z) + tame(c h(x), lim)`` (the lifted Euler-Maruyama update)
5       ``out = x + P_x(a u)`` (the lifted Euler step of an ODE)
======  =====================================================================================

with per-configuration scalars ``a, s, c, lim`` (``a = dt``, ``s = sigma sqrt(dt)``,
``c = -curvature_factor sigma^2 dt / 2``, ``lim = s``; see :func:`qmanifold.sde.integrate`).

Layouts: padded ``(B, N, 3)`` with an optional mask ``(B, N)`` (``PACKED=False``) or packed
``(P, 3)`` with segment offsets ``(B+1,)`` (``PACKED=True``). A program handles ``BLOCK_B``
configurations as a 3-D tile of points (see :func:`_tile`: each thread holds ``CHUNKS`` points of one
configuration), the three coordinates as three tiles
(stride-3 loads of the same cache lines). With ``ONE_TILE`` (every configuration fits in
``BLOCK_N`` points) the data is read once into registers and everything -- masked centring, the
six second moments and the angular momentum, the regularised inertia tensor, its adjugate inverse,
the curvature matrix and the outputs -- is computed there: no ``(B, N, 3, 3)`` or ``(B, 3, 3)``
intermediate ever reaches memory. Otherwise the kernel streams the configuration three times
(means, moments, outputs) in chunks of ``BLOCK_N`` points; the re-reads mostly hit L2.

The arithmetic mirrors :mod:`qmanifold.so3` (the plain-torch oracle): the same regulariser
``K + (c tr(K)/3 + floor) I``, the same scaled adjugate inverse, ``h = (W - tr W I) x_c`` with
``W = K_reg^-1 + (c/3) tr(K_reg^-1) I``. The tame factor of the update needs ``|h|``, which is
``sqrt(tr(M S M))`` with the curvature matrix ``M`` and the second moment ``S``: no extra pass.

The functions are plain Python; :mod:`qmanifold.kernels` wraps them with ``triton.jit`` when
Triton is importable, and :mod:`qmanifold.kernels.emulate` runs the very same functions on CPU
tensors for the tests.
"""

try:  # Triton is optional: the kernels are plain functions until qmanifold.kernels jit-compiles them
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    from . import emulate as tl

__all__ = ["KERNEL_FUNCTIONS", "se3_kernel"]


def _tile(mask_ptr, start, length, n0, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
          LANE_AXIS_FIRST: tl.constexpr):
    """Point indices of a chunk of ``BLOCK_N`` points per configuration, in-range flags and
    real-point flags, as a 3-D tile with a *lane* axis of ``L = BLOCK_N // CHUNKS`` points, the
    ``BLOCK_B`` configurations, and an *in-thread* axis of ``CHUNKS`` points: point
    ``n0 + c L + l`` of configuration ``b`` sits at ``[l, b, c]`` (``LANE_AXIS_FIRST``) or
    ``[c, b, l]``.

    Triton spreads a warp's lanes over the tile starting from its fastest axis, which for these
    strided loads is the first axis up to Triton 3.6 and the last one from 3.7 on
    (:func:`qmanifold.kernels._lane_axis_first`); the lane axis is put there. Then the lanes cover
    the ``L`` points and a few configurations, and the in-thread axis is repeated inside each
    thread: a thread holds ``CHUNKS`` points of *one* configuration, a per-configuration sum
    (:func:`_rsum`) adds them in registers and shuffles across ``L`` lanes only, and the
    per-configuration 3 x 3 algebra runs once per thread.
    """
    if LANE_AXIS_FIRST:
        cols = (n0 + tl.arange(0, BLOCK_N // CHUNKS)[:, None, None]
                + tl.arange(0, CHUNKS)[None, None, :] * (BLOCK_N // CHUNKS))
    else:
        cols = (n0 + tl.arange(0, CHUNKS)[:, None, None] * (BLOCK_N // CHUNKS)
                + tl.arange(0, BLOCK_N // CHUNKS)[None, None, :])
    pt_ok = cols < length[None, :, None]
    pidx = start[None, :, None] + cols
    if HAS_MASK:
        real = pt_ok & (tl.load(mask_ptr + pidx, mask=pt_ok, other=0) != 0)
    else:
        real = pt_ok
    return pidx, pt_ok, real


def _rsum(a, LANE_AXIS_FIRST: tl.constexpr):
    """Per-configuration sum of a tile (see :func:`_tile`) -> ``(BLOCK_B,)``: first the in-thread
    axis, then across lanes."""
    if LANE_AXIS_FIRST:
        out = tl.sum(tl.sum(a, axis=2), axis=0)
    else:
        out = tl.sum(tl.sum(a, axis=0), axis=1)
    return out


def _load3(ptr, pidx, real):
    base = ptr + pidx * 3
    a0 = tl.load(base, mask=real, other=0.0)
    a1 = tl.load(base + 1, mask=real, other=0.0)
    a2 = tl.load(base + 2, mask=real, other=0.0)
    return a0, a1, a2


def _store3(ptr, pidx, ok, a0, a1, a2):
    base = ptr + pidx * 3
    tl.store(base, a0, mask=ok)
    tl.store(base + 1, a1, mask=ok)
    tl.store(base + 2, a2, mask=ok)


def _inv_sym3(a, b, c, d, e, f, tiny):
    """Inverse of the symmetric ``[[a, b, c], [b, d, e], [c, e, f]]`` by the adjugate, after
    scaling by the mean eigenvalue (as :func:`qmanifold.so3.symmetric_inverse_3x3`)."""
    scale = tl.maximum((a + d + f) / 3.0, tiny)
    a = a / scale
    b = b / scale
    c = c / scale
    d = d / scale
    e = e / scale
    f = f / scale
    c00 = d * f - e * e
    c01 = c * e - b * f
    c02 = b * e - c * d
    c11 = a * f - c * c
    c12 = b * c - a * e
    c22 = a * d - b * b
    den = (a * c00 + b * c01 + c * c02) * scale
    return c00 / den, c01 / den, c02 / den, c11 / den, c12 / den, c22 / den


def _centre(a, mean, real, CENTER: tl.constexpr):
    if CENTER:
        out = tl.where(real, a - mean[None, :, None], 0.0)
    else:
        out = a
    return out


def _combine(u_ptr, z_ptr, pidx, real, ca, cs, MODE: tl.constexpr):
    """The vector to project: ``u`` (modes 0, 1, 3), ``a u`` (5) or ``a u + s z`` (4)."""
    u0, u1, u2 = _load3(u_ptr, pidx, real)
    if MODE == 4:
        z0, z1, z2 = _load3(z_ptr, pidx, real)
        u0 = ca[None, :, None] * u0 + cs[None, :, None] * z0
        u1 = ca[None, :, None] * u1 + cs[None, :, None] * z1
        u2 = ca[None, :, None] * u2 + cs[None, :, None] * z2
    if MODE == 5:
        u0 = ca[None, :, None] * u0
        u1 = ca[None, :, None] * u1
        u2 = ca[None, :, None] * u2
    return u0, u1, u2


def _emit(out_ptr, out2_ptr, pidx, pt_ok, x0, x1, x2, xc0, xc1, xc2, uc0, uc1, uc2,
          o0, o1, o2, m00, m01, m02, m11, m12, m22, hc, MODE: tl.constexpr):
    """Compute and store the outputs of one tile (zeros at padded points)."""
    o0 = o0[None, :, None]
    o1 = o1[None, :, None]
    o2 = o2[None, :, None]
    m00 = m00[None, :, None]
    m01 = m01[None, :, None]
    m02 = m02[None, :, None]
    m11 = m11[None, :, None]
    m12 = m12[None, :, None]
    m22 = m22[None, :, None]
    if MODE == 0:
        _store3(out_ptr, pidx, pt_ok, uc0, uc1, uc2)
    if MODE != 0 and MODE != 2:
        # P_x(u)_n = u_n - omega x x_n
        p0 = uc0 - (o1 * xc2 - o2 * xc1)
        p1 = uc1 - (o2 * xc0 - o0 * xc2)
        p2 = uc2 - (o0 * xc1 - o1 * xc0)
    if MODE >= 2 and MODE <= 4:
        h0 = m00 * xc0 + m01 * xc1 + m02 * xc2
        h1 = m01 * xc0 + m11 * xc1 + m12 * xc2
        h2 = m02 * xc0 + m12 * xc1 + m22 * xc2
    if MODE == 1:
        _store3(out_ptr, pidx, pt_ok, p0, p1, p2)
    if MODE == 2:
        _store3(out_ptr, pidx, pt_ok, h0, h1, h2)
    if MODE == 3:
        _store3(out_ptr, pidx, pt_ok, p0, p1, p2)
        _store3(out2_ptr, pidx, pt_ok, h0, h1, h2)
    if MODE == 4:
        # x is zero at padded points (masked loads), and so are P and h
        _store3(out_ptr, pidx, pt_ok, x0 + p0 + hc[None, :, None] * h0, x1 + p1 + hc[None, :, None] * h1,
                x2 + p2 + hc[None, :, None] * h2)
    if MODE == 5:
        _store3(out_ptr, pidx, pt_ok, x0 + p0, x1 + p1, x2 + p2)


def _se3_kernel(
    x_ptr, u_ptr, z_ptr, mask_ptr, offs_ptr, out_ptr, out2_ptr,
    a_ptr, a_stride, s_ptr, s_stride, c_ptr, c_stride, lim_ptr, lim_stride,
    consts_ptr, B, N,
    MODE: tl.constexpr, CENTER: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr,
    ONE_TILE: tl.constexpr, TAME: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr, LANE_AXIS_FIRST: tl.constexpr, DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    if PACKED:
        start = tl.load(offs_ptr + rows64, mask=row_ok, other=0)
        length = tl.load(offs_ptr + rows64 + 1, mask=row_ok, other=0) - start
    else:
        start = rows64 * N
        length = row_ok.to(tl.int64) * N
    reg_c = tl.load(consts_ptr)
    floor = tl.load(consts_ptr + 1)
    tiny = tl.load(consts_ptr + 2)
    zero = tl.zeros((BLOCK_B,), dtype=DTYPE)
    ca = zero
    cs = zero
    ch = zero
    clim = zero
    if MODE == 4 or MODE == 5:
        ca = tl.load(a_ptr + rows64 * a_stride, mask=row_ok, other=0.0)
    if MODE == 4:
        cs = tl.load(s_ptr + rows64 * s_stride, mask=row_ok, other=0.0)
        ch = tl.load(c_ptr + rows64 * c_stride, mask=row_ok, other=0.0)
        if TAME:
            clim = tl.load(lim_ptr + rows64 * lim_stride, mask=row_ok, other=0.0)

    # ---- pass 1: counts and means (translations) ------------------------------------------------
    mx0 = zero
    mx1 = zero
    mx2 = zero
    mu0 = zero
    mu1 = zero
    mu2 = zero
    if ONE_TILE:
        pidx, pt_ok, real = _tile(mask_ptr, start, length, 0, HAS_MASK, BLOCK_N, CHUNKS, LANE_AXIS_FIRST)
        if MODE != 0:
            x0, x1, x2 = _load3(x_ptr, pidx, real)
        if MODE != 2:
            u0, u1, u2 = _combine(u_ptr, z_ptr, pidx, real, ca, cs, MODE)
        if CENTER:
            cnt = tl.maximum(_rsum(real.to(DTYPE), LANE_AXIS_FIRST), 1.0)
            if MODE != 0:
                mx0 = _rsum(x0, LANE_AXIS_FIRST) / cnt
                mx1 = _rsum(x1, LANE_AXIS_FIRST) / cnt
                mx2 = _rsum(x2, LANE_AXIS_FIRST) / cnt
            if MODE != 2:
                mu0 = _rsum(u0, LANE_AXIS_FIRST) / cnt
                mu1 = _rsum(u1, LANE_AXIS_FIRST) / cnt
                mu2 = _rsum(u2, LANE_AXIS_FIRST) / cnt
    else:
        if CENTER:
            n_max = N
            if PACKED:
                n_max = tl.max(length, axis=0).to(tl.int32)
            cnt = zero
            for n0 in range(0, n_max, BLOCK_N):
                pidx, pt_ok, real = _tile(mask_ptr, start, length, n0, HAS_MASK, BLOCK_N, CHUNKS, LANE_AXIS_FIRST)
                cnt = cnt + _rsum(real.to(DTYPE), LANE_AXIS_FIRST)
                if MODE != 0:
                    x0, x1, x2 = _load3(x_ptr, pidx, real)
                    mx0 = mx0 + _rsum(x0, LANE_AXIS_FIRST)
                    mx1 = mx1 + _rsum(x1, LANE_AXIS_FIRST)
                    mx2 = mx2 + _rsum(x2, LANE_AXIS_FIRST)
                if MODE != 2:
                    u0, u1, u2 = _combine(u_ptr, z_ptr, pidx, real, ca, cs, MODE)
                    mu0 = mu0 + _rsum(u0, LANE_AXIS_FIRST)
                    mu1 = mu1 + _rsum(u1, LANE_AXIS_FIRST)
                    mu2 = mu2 + _rsum(u2, LANE_AXIS_FIRST)
            cnt = tl.maximum(cnt, 1.0)
            mx0 = mx0 / cnt
            mx1 = mx1 / cnt
            mx2 = mx2 / cnt
            mu0 = mu0 / cnt
            mu1 = mu1 / cnt
            mu2 = mu2 / cnt

    # ---- pass 2: second moments S and angular momentum J --------------------------------------
    s00 = zero
    s01 = zero
    s02 = zero
    s11 = zero
    s12 = zero
    s22 = zero
    j0 = zero
    j1 = zero
    j2 = zero
    if ONE_TILE:
        if MODE != 0:
            xc0 = _centre(x0, mx0, real, CENTER)
            xc1 = _centre(x1, mx1, real, CENTER)
            xc2 = _centre(x2, mx2, real, CENTER)
            s00 = _rsum(xc0 * xc0, LANE_AXIS_FIRST)
            s01 = _rsum(xc0 * xc1, LANE_AXIS_FIRST)
            s02 = _rsum(xc0 * xc2, LANE_AXIS_FIRST)
            s11 = _rsum(xc1 * xc1, LANE_AXIS_FIRST)
            s12 = _rsum(xc1 * xc2, LANE_AXIS_FIRST)
            s22 = _rsum(xc2 * xc2, LANE_AXIS_FIRST)
        if MODE != 2:
            uc0 = _centre(u0, mu0, real, CENTER)
            uc1 = _centre(u1, mu1, real, CENTER)
            uc2 = _centre(u2, mu2, real, CENTER)
            if MODE != 0:
                j0 = _rsum(xc1 * uc2 - xc2 * uc1, LANE_AXIS_FIRST)
                j1 = _rsum(xc2 * uc0 - xc0 * uc2, LANE_AXIS_FIRST)
                j2 = _rsum(xc0 * uc1 - xc1 * uc0, LANE_AXIS_FIRST)
    else:
        if MODE != 0:
            n_max = N
            if PACKED:
                n_max = tl.max(length, axis=0).to(tl.int32)
            for n0 in range(0, n_max, BLOCK_N):
                pidx, pt_ok, real = _tile(mask_ptr, start, length, n0, HAS_MASK, BLOCK_N, CHUNKS, LANE_AXIS_FIRST)
                x0, x1, x2 = _load3(x_ptr, pidx, real)
                xc0 = _centre(x0, mx0, real, CENTER)
                xc1 = _centre(x1, mx1, real, CENTER)
                xc2 = _centre(x2, mx2, real, CENTER)
                s00 = s00 + _rsum(xc0 * xc0, LANE_AXIS_FIRST)
                s01 = s01 + _rsum(xc0 * xc1, LANE_AXIS_FIRST)
                s02 = s02 + _rsum(xc0 * xc2, LANE_AXIS_FIRST)
                s11 = s11 + _rsum(xc1 * xc1, LANE_AXIS_FIRST)
                s12 = s12 + _rsum(xc1 * xc2, LANE_AXIS_FIRST)
                s22 = s22 + _rsum(xc2 * xc2, LANE_AXIS_FIRST)
                if MODE != 2:
                    u0, u1, u2 = _combine(u_ptr, z_ptr, pidx, real, ca, cs, MODE)
                    uc0 = _centre(u0, mu0, real, CENTER)
                    uc1 = _centre(u1, mu1, real, CENTER)
                    uc2 = _centre(u2, mu2, real, CENTER)
                    j0 = j0 + _rsum(xc1 * uc2 - xc2 * uc1, LANE_AXIS_FIRST)
                    j1 = j1 + _rsum(xc2 * uc0 - xc0 * uc2, LANE_AXIS_FIRST)
                    j2 = j2 + _rsum(xc0 * uc1 - xc1 * uc0, LANE_AXIS_FIRST)

    # ---- the 3 x 3 algebra, per configuration ------------------------------------------------
    # inertia tensor K = tr(S) I - S, regularised: K + (c tr(K)/3 + floor) I
    tr_s = s00 + s11 + s22
    k00 = tr_s - s00
    k11 = tr_s - s11
    k22 = tr_s - s22
    shift = reg_c * (k00 + k11 + k22) / 3.0 + floor
    i00, i01, i02, i11, i12, i22 = _inv_sym3(k00 + shift, -s01, -s02, k11 + shift, -s12, k22 + shift, tiny)
    # omega = K_reg^-1 J
    o0 = i00 * j0 + i01 * j1 + i02 * j2
    o1 = i01 * j0 + i11 * j1 + i12 * j2
    o2 = i02 * j0 + i12 * j1 + i22 * j2
    # curvature matrix M = W - tr(W) I, W = K_reg^-1 + (c/3) tr(K_reg^-1) I  (h_n = M x_n)
    # (diagonal written without the cancellation i00 - tr(K^-1): on the singular set i00 ~ 1/(c tr K))
    w_diag = reg_c / 3.0 * (i00 + i11 + i22)
    m00 = -(i11 + i22) - 2.0 * w_diag
    m11 = -(i00 + i22) - 2.0 * w_diag
    m22 = -(i00 + i11) - 2.0 * w_diag
    m01 = i01
    m02 = i02
    m12 = i12
    hc = ch
    if MODE == 4:  # noqa: SIM102 - one constexpr branch per mode, as in the other kernels
        if TAME:
            # |h|^2 = sum_n |M x_n|^2 = tr(M S M); tame(c h, lim) = c h min(lim / |c h|, 1)
            t00 = m00 * s00 + m01 * s01 + m02 * s02
            t01 = m00 * s01 + m01 * s11 + m02 * s12
            t02 = m00 * s02 + m01 * s12 + m02 * s22
            t11 = m01 * s01 + m11 * s11 + m12 * s12
            t12 = m01 * s02 + m11 * s12 + m12 * s22
            t22 = m02 * s02 + m12 * s12 + m22 * s22
            t10 = m01 * s00 + m11 * s01 + m12 * s02
            t20 = m02 * s00 + m12 * s01 + m22 * s02
            t21 = m02 * s01 + m12 * s11 + m22 * s12
            h_sq = (t00 * m00 + t01 * m01 + t02 * m02 + t10 * m01 + t11 * m11 + t12 * m12
                    + t20 * m02 + t21 * m12 + t22 * m22)
            norm = tl.abs(ch) * tl.sqrt(tl.maximum(h_sq, 0.0))
            hc = ch * tl.minimum(clim / tl.maximum(norm, tiny), 1.0)

    # ---- pass 3: outputs ---------------------------------------------------------------------
    if ONE_TILE:
        if MODE == 0:
            x0 = uc0
            x1 = uc0
            x2 = uc0
            xc0 = uc0
            xc1 = uc0
            xc2 = uc0
        if MODE == 2:
            uc0 = xc0
            uc1 = xc0
            uc2 = xc0
        _emit(out_ptr, out2_ptr, pidx, pt_ok, x0, x1, x2, xc0, xc1, xc2, uc0, uc1, uc2,
              o0, o1, o2, m00, m01, m02, m11, m12, m22, hc, MODE)
    else:
        n_max = N
        if PACKED:
            n_max = tl.max(length, axis=0).to(tl.int32)
        for n0 in range(0, n_max, BLOCK_N):
            pidx, pt_ok, real = _tile(mask_ptr, start, length, n0, HAS_MASK, BLOCK_N, CHUNKS, LANE_AXIS_FIRST)
            if MODE != 0:
                x0, x1, x2 = _load3(x_ptr, pidx, real)
                xc0 = _centre(x0, mx0, real, CENTER)
                xc1 = _centre(x1, mx1, real, CENTER)
                xc2 = _centre(x2, mx2, real, CENTER)
            if MODE != 2:
                u0, u1, u2 = _combine(u_ptr, z_ptr, pidx, real, ca, cs, MODE)
                uc0 = _centre(u0, mu0, real, CENTER)
                uc1 = _centre(u1, mu1, real, CENTER)
                uc2 = _centre(u2, mu2, real, CENTER)
            if MODE == 0:
                x0 = uc0
                x1 = uc0
                x2 = uc0
                xc0 = uc0
                xc1 = uc0
                xc2 = uc0
            if MODE == 2:
                uc0 = xc0
                uc1 = xc0
                uc2 = xc0
            _emit(out_ptr, out2_ptr, pidx, pt_ok, x0, x1, x2, xc0, xc1, xc2, uc0, uc1, uc2,
                  o0, o1, o2, m00, m01, m02, m11, m12, m22, hc, MODE)


#: The plain functions of this kernel, by name (jit-compiled or emulated by qmanifold.kernels).
KERNEL_FUNCTIONS = {
    "_tile": _tile,
    "_rsum": _rsum,
    "_load3": _load3,
    "_store3": _store3,
    "_inv_sym3": _inv_sym3,
    "_centre": _centre,
    "_combine": _combine,
    "_emit": _emit,
    "_se3_kernel": _se3_kernel,
}
se3_kernel = _se3_kernel
