"""Triton kernels of multi-scale deformable attention. Imported only when the Triton backend
runs (this module imports triton); see triton.py for the op around them.

One program serves BLOCK_R rows (b, q, h) and all D channels (a [BLOCK_R, BLOCK_D] tile);
the location and weight math is per row and point, vectorised over the rows, not per channel.
Bilinear sampling as in csrc/ms_deform_attn/ms_deform_attn_math.h (align_corners=False, zero
padding); a location outside [-1, W_l] x [-1, H_l] in pixels samples nothing, which also covers
inf and NaN before any float->int conversion. DISCRETE (a constexpr: its own compiled kernel)
is RT-DETRv2's nearest-cell sampling, as ``nearest_cell`` / ``discrete_corner`` there: one
cell per point, weight 1, zero location gradient.
"""
import triton
import triton.language as tl

# accumulation type: float32 for float32/float16/bfloat16, float64 for float64 (gradcheck)
ACC_FLOAT32 = tl.float32
ACC_FLOAT64 = tl.float64


@triton.jit
def _point(loc, attn, shapes, starts, r, rmask, l: tl.constexpr, j, NP: tl.constexpr,
           ACC: tl.constexpr):
    """Point j of level l in rows r: the level's height, width and first row, the normalised
    location (x, y) and the attention weight."""
    lh = tl.load(shapes + 2 * l)
    lw = tl.load(shapes + 2 * l + 1)
    ls = tl.load(starts + l)
    x = tl.load(loc + (r * NP + j) * 2, mask=rmask, other=0.0).to(ACC)
    y = tl.load(loc + (r * NP + j) * 2 + 1, mask=rmask, other=0.0).to(ACC)
    a = tl.load(attn + r * NP + j, mask=rmask, other=0.0).to(ACC)
    return lh, lw, ls, x, y, a


@triton.jit
def _corners(loc, attn, shapes, starts, r, rmask, S, l: tl.constexpr, j, NP: tl.constexpr,
             ACC: tl.constexpr):
    lh, lw, ls, x, y, a = _point(loc, attn, shapes, starts, r, rmask, l, j, NP, ACC)
    lwf = lw.to(ACC)
    lhf = lh.to(ACC)
    # a level reaching past S (metadata not validated on the device) samples nothing
    ix = tl.where(ls + lh * lw <= S, x * lwf - 0.5, -2.0)
    iy = y * lhf - 0.5
    inside = rmask & (ix >= -1.0) & (ix <= lwf) & (iy >= -1.0) & (iy <= lhf)
    ix = tl.where(inside, ix, 0.0)
    iy = tl.where(inside, iy, 0.0)
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    lx = ix - fx
    ly = iy - fy
    x0 = fx.to(tl.int64)
    y0 = fy.to(tl.int64)
    # ix == W (iy == H) exactly floors to a corner past the level: check both bounds
    x0_in = inside & (x0 >= 0) & (x0 < lw)
    x1_in = inside & (x0 + 1 >= 0) & (x0 + 1 < lw)
    y0_in = (y0 >= 0) & (y0 < lh)
    y1_in = (y0 + 1 >= 0) & (y0 + 1 < lh)
    base = ls + y0 * lw + x0
    return lh, lw, a, lx, ly, base, x0_in & y0_in, x1_in & y0_in, x0_in & y1_in, x1_in & y1_in


@triton.jit
def _nearest(t, n, ACC: tl.constexpr):
    # clamp(floor(t*n + 0.5), 0, n-1) in floating point before the conversion; NaN fails the
    # first comparison and takes cell 0 (the launch disables FMA fusion: see triton.py)
    nf = n.to(ACC)
    f = tl.floor(t * nf + 0.5)
    f = tl.where(f >= 0.0, f, 0.0)
    f = tl.where(f >= nf - 1.0, nf - 1.0, f)
    return f.to(tl.int64)


@triton.jit
def _cell(loc, attn, shapes, starts, r, rmask, S, l: tl.constexpr, j, NP: tl.constexpr,
          ACC: tl.constexpr):
    """Discrete sampling of point j: weight, row of value, and whether it is read (only a
    level reaching past S, metadata not validated on the device, reads nothing)."""
    lh, lw, ls, x, y, a = _point(loc, attn, shapes, starts, r, rmask, l, j, NP, ACC)
    row = ls + _nearest(y, lh, ACC) * lw + _nearest(x, lw, ACC)
    # through where: the interpreter cannot combine a scalar and a block mask with &
    row = tl.where(ls + lh * lw <= S, row, -1)
    return a, row, rmask & (row >= 0)


@triton.jit
def _bilinear_fwd(value, loc, attn, shapes, starts, r, rmask, S, vb, d, dmask,
                  H: tl.constexpr, D: tl.constexpr, l: tl.constexpr, j, NP: tl.constexpr,
                  ACC: tl.constexpr):
    lh, lw, a, lx, ly, base, v00, v01, v10, v11 = _corners(
        loc, attn, shapes, starts, r, rmask, S, l, j, NP, ACC)
    hx = 1.0 - lx
    hy = 1.0 - ly
    off = vb + base * (H * D)
    m = v00[:, None] & dmask[None, :]
    v = tl.load(value + off[:, None] + d[None, :], mask=m, other=0.0).to(ACC)
    acc = (a * hy * hx)[:, None] * v
    m = v01[:, None] & dmask[None, :]
    v = tl.load(value + (off + H * D)[:, None] + d[None, :], mask=m, other=0.0)
    acc += (a * hy * lx)[:, None] * v.to(ACC)
    m = v10[:, None] & dmask[None, :]
    v = tl.load(value + (off + lw * H * D)[:, None] + d[None, :], mask=m, other=0.0)
    acc += (a * ly * hx)[:, None] * v.to(ACC)
    m = v11[:, None] & dmask[None, :]
    v = tl.load(value + (off + (lw + 1) * H * D)[:, None] + d[None, :], mask=m, other=0.0)
    acc += (a * ly * lx)[:, None] * v.to(ACC)
    return acc


@triton.jit
def _discrete_fwd(value, loc, attn, shapes, starts, r, rmask, S, vb, d, dmask,
                  H: tl.constexpr, D: tl.constexpr, l: tl.constexpr, j, NP: tl.constexpr,
                  ACC: tl.constexpr):
    a, row, valid = _cell(loc, attn, shapes, starts, r, rmask, S, l, j, NP, ACC)
    m = valid[:, None] & dmask[None, :]
    v = tl.load(value + (vb + row * (H * D))[:, None] + d[None, :], mask=m, other=0.0)
    return a[:, None] * v.to(ACC)


@triton.jit
def ms_deform_attn_fwd(value, shapes, starts, loc, attn, out, rows, S, Q,
                       H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                       DISCRETE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    h = r % H
    b = r // (Q * H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    vb = (b * S * H + h) * D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for l in tl.static_range(L):
        for p in tl.static_range(P):
            if DISCRETE:
                acc += _discrete_fwd(value, loc, attn, shapes, starts, r, rmask, S, vb, d, dmask,
                                     H, D, l, l * P + p, L * P, ACC)
            else:
                acc += _bilinear_fwd(value, loc, attn, shapes, starts, r, rmask, S, vb, d, dmask,
                                     H, D, l, l * P + p, L * P, ACC)
    tl.store(out + r[:, None] * D + d[None, :], acc.to(out.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _corner_bwd(value, grad_value, off, valid, dmask, d, g, wa, ACC: tl.constexpr):
    m = valid[:, None] & dmask[None, :]
    ptr = off[:, None] + d[None, :]
    v = tl.load(value + ptr, mask=m, other=0.0).to(ACC)
    tl.atomic_add(grad_value + ptr, wa[:, None] * g, mask=m)
    return tl.sum(g * v, axis=1)


@triton.jit
def _bilinear_bwd(value, loc, attn, shapes, starts, grad_value, grad_loc, grad_attn, r, rmask,
                  S, vb, d, dmask, g, H: tl.constexpr, D: tl.constexpr, l: tl.constexpr, j,
                  NP: tl.constexpr, ACC: tl.constexpr):
    lh, lw, a, lx, ly, base, v00, v01, v10, v11 = _corners(
        loc, attn, shapes, starts, r, rmask, S, l, j, NP, ACC)
    hx = 1.0 - lx
    hy = 1.0 - ly
    off = vb + base * (H * D)
    dot00 = _corner_bwd(value, grad_value, off, v00, dmask, d, g, a * hy * hx, ACC)
    dot01 = _corner_bwd(value, grad_value, off + H * D, v01, dmask, d, g, a * hy * lx, ACC)
    dot10 = _corner_bwd(value, grad_value, off + lw * H * D, v10, dmask, d, g, a * ly * hx,
                        ACC)
    dot11 = _corner_bwd(value, grad_value, off + (lw + 1) * H * D, v11, dmask, d, g,
                        a * ly * lx, ACC)
    ga = hy * hx * dot00 + hy * lx * dot01 + ly * hx * dot10 + ly * lx * dot11
    d_ix = hy * (dot01 - dot00) + ly * (dot11 - dot10)
    d_iy = hx * (dot10 - dot00) + lx * (dot11 - dot01)
    pj = r * NP + j
    tl.store(grad_attn + pj, ga.to(grad_attn.dtype.element_ty), mask=rmask)
    tl.store(grad_loc + 2 * pj, (a * d_ix * lw.to(ACC)).to(grad_loc.dtype.element_ty),
             mask=rmask)
    tl.store(grad_loc + 2 * pj + 1, (a * d_iy * lh.to(ACC)).to(grad_loc.dtype.element_ty),
             mask=rmask)


@triton.jit
def _discrete_bwd(value, loc, attn, shapes, starts, grad_value, grad_attn, r, rmask, S, vb, d,
                  dmask, g, H: tl.constexpr, D: tl.constexpr, l: tl.constexpr, j,
                  NP: tl.constexpr, ACC: tl.constexpr):
    # the location gradient stays the zeros it was allocated as
    a, row, valid = _cell(loc, attn, shapes, starts, r, rmask, S, l, j, NP, ACC)
    dot = _corner_bwd(value, grad_value, vb + row * (H * D), valid, dmask, d, g, a, ACC)
    tl.store(grad_attn + r * NP + j, dot.to(grad_attn.dtype.element_ty), mask=rmask)


@triton.jit
def ms_deform_attn_bwd(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc,
                       grad_attn, rows, S, Q, H: tl.constexpr, D: tl.constexpr,
                       L: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr, ACC: tl.constexpr, DISCRETE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    h = r % H
    b = r // (Q * H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    vb = (b * S * H + h) * D
    g = tl.load(grad_out + r[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(ACC)
    for l in tl.static_range(L):
        for p in tl.static_range(P):
            if DISCRETE:
                _discrete_bwd(value, loc, attn, shapes, starts, grad_value, grad_attn, r, rmask,
                              S, vb, d, dmask, g, H, D, l, l * P + p, L * P, ACC)
            else:
                _bilinear_bwd(value, loc, attn, shapes, starts, grad_value, grad_loc, grad_attn,
                              r, rmask, S, vb, d, dmask, g, H, D, l, l * P + p, L * P, ACC)
