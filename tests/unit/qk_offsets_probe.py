"""A kernel that stores the offsets the qk_norm_rope kernel computes for one program. A module of
its own: Triton resolves the functions a kernel calls through its module's globals. Imported only
by the interpreter test's child process, where Triton is installed."""

import triton
import triton.language as tl

from zimage_backend.qk_norm_rope_triton import offsets


@triton.jit
def probe(out_ptr, block, head, program, batch, seq, stride_qkv_b, stride_qkv_s, stride_f_b,
          stride_f_s, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    s, which, src, dst, rotation = offsets(block, head, program, batch, seq, stride_qkv_b,
                                        stride_qkv_s, stride_f_b, stride_f_s, HEADS, HEAD_DIM,
                                        BLOCK_S)
    tile = tl.arange(0, BLOCK_S)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(out_ptr + tile, dst)
    tl.store(out_ptr + BLOCK_S * HEAD_DIM + tile, src)
