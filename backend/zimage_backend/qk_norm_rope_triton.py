"""The Triton code of the qk_norm_rope kernel (qk_norm_rope.py builds and checks it). A module
of its own because Triton resolves the functions a kernel calls through the module's globals;
imported only where Triton is installed."""

import triton
import triton.language as tl


@triton.jit
def offsets(block, head, program, batch, seq, stride_qkv_b, stride_qkv_s, stride_f_b,
            stride_f_s, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """Element offsets of one program's tile, in int64: at the largest shapes the limits
    allow, 3 * batch * heads * seq * head_dim passes 2**31."""
    head = head.to(tl.int64)
    which = (program // batch).to(tl.int64)
    b = (program % batch).to(tl.int64)
    s = block.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    src = b * stride_qkv_b + s[:, None] * stride_qkv_s + \
        ((which * HEADS + head) * HEAD_DIM + d)[None, :]
    dst = (((which * batch + b) * HEADS + head) * seq + s[:, None]) * HEAD_DIM + d[None, :]
    rotation = b * stride_f_b + s[:, None] * stride_f_s + 2 * tl.arange(0, HEAD_DIM // 2)[None, :]
    return s, which, src, dst, rotation


@triton.jit
def qk_norm_rope_kernel(qkv_ptr, stride_qkv_b, stride_qkv_s, weight_ptr, freqs_ptr,
                        stride_f_b, stride_f_s, out_ptr, batch, seq, eps,
                        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    # program (token block, head, {q, k, v} x batch)
    s, which, src_offsets, dst_offsets, rotation = offsets(
        tl.program_id(0), tl.program_id(1), tl.program_id(2), batch, seq, stride_qkv_b,
        stride_qkv_s, stride_f_b, stride_f_s, HEADS, HEAD_DIM, BLOCK_S)
    rows = s[:, None] < seq
    src = qkv_ptr + src_offsets
    dst = out_ptr + dst_offsets
    if which == 2:  # v: only its layout changes
        tl.store(dst, tl.load(src, mask=rows), mask=rows)
    else:
        d = tl.arange(0, HEAD_DIM)
        x = tl.load(src, mask=rows, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        dtype = out_ptr.dtype.element_ty
        weight = tl.load(weight_ptr + which * HEAD_DIM + d).to(tl.float32)
        # diffusers' RMSNorm: normalized in float32, cast to the weight's dtype, times the
        # weight; its rotary embedding then works on that tensor in float32.
        y = (x * rstd[:, None]).to(dtype).to(tl.float32)
        y = (y * weight[None, :]).to(dtype).to(tl.float32)
        real, imag = tl.split(tl.reshape(y, (BLOCK_S, HEAD_DIM // 2, 2)))
        cos = tl.load(freqs_ptr + rotation, mask=rows, other=0.0)
        sin = tl.load(freqs_ptr + rotation + 1, mask=rows, other=0.0)
        out = tl.reshape(tl.join(real * cos - imag * sin, real * sin + imag * cos),
                         (BLOCK_S, HEAD_DIM))
        tl.store(dst, out.to(dtype), mask=rows)
