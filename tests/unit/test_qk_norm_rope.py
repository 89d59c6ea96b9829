"""The q/k norm and RoPE kernel computes what the torch code it replaces computes.

Triton's interpreter runs the kernel on the CPU, in a child process: TRITON_INTERPRET must be
set before the kernel is built, and an operator registers once per process. On a GPU the
engine checks the compiled kernel once more at start (qk_norm_rope.self_check).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers.models.normalization import RMSNorm

from zimage_backend import fusion, qk_norm_rope
from zimage_backend.random_models import build_tiny_pipeline


def _random_inputs(batch: int, seq: int, heads: int, head_dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, generator=gen).to(dtype)
    weight = (torch.rand(2, head_dim, generator=gen) + 0.5).to(dtype)
    angles = torch.rand(batch, seq, head_dim // 2, generator=gen) * 6.3
    freqs = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    return qkv, weight, freqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_diffusers_norm_then_rotary(dtype):
    qkv, weight, freqs = _random_inputs(2, 19, 3, 32, dtype)
    out = qk_norm_rope.reference(qkv, weight, freqs, 3, 1e-5)
    q, k, v = qkv.unflatten(-1, (3, 3, 32)).unbind(-3)
    for i, (x, w) in enumerate(((q, weight[0]), (k, weight[1]))):
        norm = RMSNorm(32, eps=1e-5).to(dtype)
        norm.weight.data.copy_(w)
        with torch.no_grad():
            want = fusion.apply_rotary(norm(x), torch.view_as_complex(freqs)).transpose(1, 2)
        assert torch.equal(out[i], want)
    assert torch.equal(out[2], v.transpose(1, 2))


def test_head_sizes_the_kernel_takes():
    assert qk_norm_rope.fits(30, 128) and qk_norm_rope.fits(2, 16)
    assert not qk_norm_rope.fits(30, 96) and not qk_norm_rope.fits(4, 8)
    assert not qk_norm_rope.fits(1, 512)


def test_the_kernel_needs_fused_projections():
    transformer = copy.deepcopy(build_tiny_pipeline(seed=3).transformer)
    assert fusion.attach_qk_norm_rope(transformer, torch.device("cuda")) == \
        "needs fuse_projections"


def test_one_unit_in_the_last_place_is_the_most_a_value_may_differ():
    want = torch.tensor([1.0, 2.0, -3.0, 100.0], dtype=torch.bfloat16)
    one_ulp = torch.tensor([1.0078125, 2.0, -3.0, 100.0], dtype=torch.bfloat16)
    assert qk_norm_rope.mismatch(one_ulp, want) is None
    two_ulps = torch.tensor([1.015625, 2.0, -3.0, 100.0], dtype=torch.bfloat16)
    assert "differ by more than 1 unit(s)" in qk_norm_rope.mismatch(two_ulps, want)
    assert qk_norm_rope.mismatch(torch.full_like(want, float("nan")), want) == "not finite"


_CHILD = textwrap.dedent("""
    import copy, torch
    from zimage_backend import fusion, qk_norm_rope
    from zimage_backend.random_models import build_tiny_pipeline
    from tests.unit.test_qk_norm_rope import _random_inputs
    from tests.unit.test_transformer_rewrites import _forward

    op = qk_norm_rope.operator()
    # Odd lengths and a batch: rows past the end of a block must be left alone.
    for batch, seq, heads, dim in ((1, 8, 1, 16), (2, 37, 3, 32), (3, 5, 2, 64)):
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2 ** -9)):
            args = _random_inputs(batch, seq, heads, dim, dtype) + (heads, 1e-5)
            got, want = op(*args), qk_norm_rope.reference(*args)
            assert got.shape == (3, batch, heads, seq, dim), got.shape
            worst = ((got.float() - want.float()).abs() / want.float().abs().clamp(min=1)).max()
            assert worst <= tolerance, (batch, seq, heads, dim, dtype, worst.item())

    # The served shape, 30 heads of 128, rounded to 16 bits where the model rounds: one unit
    # in the last place at most. In float16: the interpreter's bfloat16 casts do not round as a
    # GPU's do (59% of the values one unit off, float16 0.002%); the engine's start-up check
    # runs bfloat16 on the GPU itself.
    args = _random_inputs(2, 40, 30, 128, torch.float16) + (30, 1e-6)
    assert qk_norm_rope.mismatch(op(*args), qk_norm_rope.reference(*args)) is None
    assert qk_norm_rope.self_check(torch.device("cpu"), 30, 128, 1e-6, torch.float16) is None

    # The last program at a shape whose offsets pass 2**31 (12 images of 2048x2048, raised
    # limits): int32 arithmetic would wrap them.
    from tests.unit.qk_offsets_probe import probe
    batch, seq, heads, dim, block_s = 12, 16896, 30, 128, 8
    out = torch.zeros(2 * block_s * dim, dtype=torch.int64)
    block, head, program = (seq + block_s - 1) // block_s - 1, heads - 1, 3 * batch - 1
    stride_b, stride_s = seq * 3 * heads * dim, 3 * heads * dim
    probe[(1,)](out, block, head, program, batch, seq, stride_b, stride_s,
                           seq * dim, dim, HEADS=heads, HEAD_DIM=dim, BLOCK_S=block_s)
    which, b = program // batch, program % batch
    s0 = block * block_s
    dst0 = (((which * batch + b) * heads + head) * seq + s0) * dim
    src0 = b * stride_b + s0 * stride_s + (which * heads + head) * dim
    assert dst0 > 2 ** 31 and src0 > 2 ** 31
    assert out[0].item() == dst0 and out[block_s * dim].item() == src0, (out[0], dst0)
    assert out[block_s * dim - 1].item() == dst0 + (block_s - 1) * dim + dim - 1

    # The whole tiny transformer, kernel against torch code, through the attention processor.
    fused = copy.deepcopy(build_tiny_pipeline(seed=3).transformer)
    fusion.fuse_transformer(fused)
    expected = _forward(fused, 0)
    assert fusion.attach_qk_norm_rope(fused, torch.device("cpu")) is None
    got = _forward(fused, 0)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    print("kernel ok")
""")


def in_triton_interpreter(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a child Python with TRITON_INTERPRET set, from the repository root."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)


def test_kernel_matches_the_torch_code_in_triton_interpreter():
    result = in_triton_interpreter(_CHILD)
    assert result.returncode == 0 and "kernel ok" in result.stdout, result.stderr[-3000:]
