"""The accumulator's roundings as jit functions shared by the chip GEMM kernels (``chip_gemm``'s Triton kernel and
``chip_gemm_hopper``'s Gluon kernel): one definition of each add, so the two kernels round alike."""
import triton
import triton.language as tl


@triton.jit
def _round_rne(x, DROP: tl.constexpr):
    """float32 ``x`` rounded to 23 - DROP stored mantissa bits, to nearest even, on its bit pattern."""
    iv = x.to(tl.int32, bitcast=True)
    iv = (iv + (((iv >> DROP) & 1) + ((1 << (DROP - 1)) - 1))) & (-(1 << DROP))
    return iv.to(tl.float32, bitcast=True)


@triton.jit
def _add_acc(acc, s, DROP: tl.constexpr, RNE: tl.constexpr, EXACT: tl.constexpr):
    """acc + s rounded to 23 - DROP stored mantissa bits (RNE or toward zero). EXACT: 0 a float32 add then the
    rounding (a double rounding), 1 ``add.rz`` then truncation (toward zero only; CUDA), 2 TwoSum's error term
    decides what the float32 add hid (ties for RNE, a value just under a grid point for toward zero)."""
    # one return at the end: Triton 3.6 compiles the statements after a return inside a constexpr `if` too
    if EXACT == 1:
        out = tl.inline_asm_elementwise("add.rz.f32 $0, $1, $2;", "=r,r,r", [acc, s], dtype=tl.float32,
                                        is_pure=True, pack=1)
        if DROP > 0:
            out = (out.to(tl.int32, bitcast=True) & (-(1 << DROP))).to(tl.float32, bitcast=True)
    else:
        x = acc + s
        if RNE and DROP == 0:                 # the float32 add is the rounding
            out = x
        else:
            iv = x.to(tl.int32, bitcast=True)
            if EXACT == 2:                    # TwoSum (Knuth): x + err == acc + s exactly
                bb = x - acc
                err = (acc - (x - bb)) + (s - bb)
                away = ((err > 0) & (x > 0)) | ((err < 0) & (x < 0))
                toward = ((err < 0) & (x > 0)) | ((err > 0) & (x < 0))
            if RNE:
                half = 1 << (DROP - 1)
                bias = ((iv >> DROP) & 1) + (half - 1)
                if EXACT == 2:
                    tie = (iv & ((1 << DROP) - 1)) == half
                    bias = tl.where(tie & away, half, tl.where(tie & toward, 0, bias))
                iv = (iv + bias) & (-(1 << DROP))
            else:
                kept = iv & (-(1 << DROP))
                if EXACT == 2:                # x on the grid but the exact sum just inside it: one step down
                    kept = tl.where((kept == iv) & toward, kept - (1 << DROP), kept)
                iv = kept
            out = iv.to(tl.float32, bitcast=True)
    return out
