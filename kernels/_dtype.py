"""Loads, stores and roundings of the Triton kernels that read bfloat16 / half / float32 / float64 data
and compute in an accumulator type ``ACC`` (float32, or float64 for float64 data); shared by
``saliency_mask`` and ``loss_head``."""
import triton
import triton.language as tl


# bfloat16 <-> float32 by bit manipulation: exact and identical on the GPU and in the interpreter,
# whose bf16 casts truncate instead of rounding and mishandle subnormals (triton 3.9).
@triton.jit
def _load(ptr, offs, inb, ACC: tl.constexpr):
    # ptr[offs] as ACC (0 where not inb); bfloat16 widened exactly by a 16-bit shift
    if ptr.dtype.element_ty == tl.bfloat16:
        b = tl.load(ptr + offs, mask=inb, other=0.0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (b << 16).to(tl.float32, bitcast=True).to(ACC)
    else:
        return tl.load(ptr + offs, mask=inb, other=0.0).to(ACC)


@triton.jit
def _store(ptr, offs, v, inb):
    # ptr[offs] = v, v already rounded to ptr's dtype (so the cast is exact)
    if ptr.dtype.element_ty == tl.bfloat16:
        b = (v.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        tl.store(ptr + offs, b.to(tl.bfloat16, bitcast=True), mask=inb)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=inb)


@triton.jit
def _round_to(v, DT: tl.constexpr):
    # fp32 / fp64 v rounded to DT's precision, still as v's type. bfloat16 by the integer
    # round-to-nearest-even of c10::BFloat16 (NaN kept); other dtypes by a cast (round-to-nearest-even
    # on the GPU and in numpy).
    if DT == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(v != v, v, r)
    else:
        return v.to(DT).to(v.dtype)
