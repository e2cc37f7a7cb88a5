"""Residual add + LayerNorm in one pass over memory, for the packed GPU path.

Each block of the packed forward adds a sublayer's output to the residual stream and then
normalises it for the next sublayer: two kernels, five passes over (N, 768) bf16 values (add:
read 2, write 1; LayerNorm: read 1, write 1). Together they took ~20% of a pass on an H200
(benchmarks/model_profile.py). Here one Triton kernel reads the two inputs once and writes
the sum and its normalised form: four passes, one launch. Where Triton is not installed or
the tensors are not on a GPU, the same two steps run in torch.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without it
    triton = None

ROWS_PER_PROGRAM = 4

if triton is not None:

    # Not specialised on the row count: Triton would compile again (~0.5 s) for each new
    # residue of it mod 16, and the packed passes' row counts vary.
    @triton.jit(do_not_specialize=["n_rows"])
    def _add_layer_norm_kernel(x_ptr, delta_ptr, weight_ptr, bias_ptr, sum_ptr, out_ptr,
                               scale_ptr, n_rows, n_cols, eps, BLOCK: tl.constexpr,
                               ROWS: tl.constexpr, QUANTIZE: tl.constexpr = False):
        # QUANTIZE (model/fp8.py): out_ptr is e4m3, each row scaled to its amax / 448 and
        # the scale stored at scale_ptr; otherwise scale_ptr is unused.
        # int64: a large pass (N x C) passes 2**31 elements.
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]).to(tl.int64)
        cols = tl.arange(0, BLOCK)[None, :]
        inside = (rows < n_rows) & (cols < n_cols)
        offsets = rows * n_cols + cols
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        delta = tl.load(delta_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        # The residual stream stays in the input's dtype, as in the unfused forward.
        total = (x + delta).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, total, mask=inside)
        total = total.to(tl.float32)
        mean = tl.sum(total, axis=1) / n_cols
        centred = tl.where(inside, total - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
        weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        out = centred * rstd[:, None] * weight + bias
        if QUANTIZE:
            scale = tl.maximum(tl.max(tl.abs(out), axis=1) / 448.0, 1e-12)
            out = tl.clamp(out / scale[:, None], -448.0, 448.0)
            tl.store(scale_ptr + rows, scale[:, None], mask=rows < n_rows)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=inside)


def fused_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.dim() == 2


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, norm: nn.LayerNorm
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)) for (N, C) tensors."""
    if not fused_available(x):
        x = x + delta
        return x, norm(x)
    x, delta = x.contiguous(), delta.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    n_rows, n_cols = x.shape
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)
    _add_layer_norm_kernel[grid](x, delta, norm.weight, norm.bias, total, out, out, n_rows,
                                 n_cols, norm.eps, BLOCK=triton.next_power_of_2(n_cols),
                                 ROWS=ROWS_PER_PROGRAM, num_warps=4)
    return total, out


def compile_for(device: torch.device, dtype: torch.dtype, n_cols: int) -> None:
    """Compile the kernel for (N, n_cols) tensors of `dtype` on `device` now, by running it
    once on a few rows, instead of in the first forward pass (~0.5-2 s)."""
    with torch.cuda.device(device):
        x = torch.zeros(ROWS_PER_PROGRAM, n_cols, device=device, dtype=dtype)
        add_layer_norm(x, x, nn.LayerNorm(n_cols, device=device, dtype=dtype))
        torch.cuda.synchronize()


def start_compile(device: torch.device, dtype: torch.dtype, n_cols: int) -> threading.Thread:
    """`compile_for` in a thread of its own, already started; join it before the first
    forward pass."""
    thread = threading.Thread(target=compile_for, args=(device, dtype, n_cols))
    thread.start()
    return thread
