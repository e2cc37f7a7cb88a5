"""The packed forward with its four linear layers in FP8 (`--precision fp8`, Hopper and Ada).

Each linear layer's weight is stored once as float8 e4m3 with one scale per output column;
each activation that enters a linear layer is quantised per row (per token) on the fly, its
scale its largest magnitude / 448 (e4m3's largest value). `torch._scaled_mm` multiplies the
two on the tensor cores' FP8 path, accumulates in fp32, applies both scales and the bias, and
writes bf16. Everything else (attention, GELU, LayerNorm, the residual stream) stays bf16 as
in the bf16 path, and the quantising is fused into the kernels that make each input anyway:

    ln_1 / ln_2   add + LayerNorm + quantise  (one Triton kernel: fused.add_layer_norm's, plus
                                               the row's amax and the cast)
    c_fc -> c_proj  GELU + quantise           (one kernel over the (N, 4C) activations)
    attention -> c_proj  quantise             (the same kernel without the GELU)

Per-row scales keep an outlier token from costing the others their precision; GPT-2's
residual stream has a few such dimensions, but the inputs of the linear layers are
LayerNorm'd or bounded (GELU, attention outputs). Where Triton is missing (CPU builds of
torch: the tests) the same steps run in torch, so the arithmetic is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without it
    triton = None

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # e4m3fn's largest finite value
MIN_SCALE = 1e-12  # an all-zero row (a pad) would divide by zero
GELU_C = 0.7978845608028654  # sqrt(2 / pi), GPT-2's tanh GELU


def unsupported_reason(device: torch.device) -> str | None:
    """Why FP8 matmuls can't run on `device`, or None where they can."""
    if device.type != "cuda":
        return "FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or later (Ada, Hopper)"
    if FP8 is None or not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no float8 matmul"
    if triton is None:
        return "Triton is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} (compute capability {major}.{minor}) has no FP8 tensor cores"
    return None


@dataclass
class Fp8Linear:
    """A linear layer's weight in e4m3 (out, in), a scale per output, and its bias (bf16)."""

    weight: torch.Tensor
    scale: torch.Tensor  # (1, out) float32
    bias: torch.Tensor

    @classmethod
    def of(cls, linear: nn.Linear) -> Fp8Linear:
        # Row-major, whatever the loaded weight's strides (a checkpoint's Conv1D weights come
        # transposed): cuBLASLt takes only a row-major times a column-major operand.
        w = linear.weight.detach().float().contiguous()
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
        return cls(q, scale.view(1, -1).contiguous(), linear.bias.detach().to(torch.bfloat16))

    def __call__(self, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """x_q (N, in) e4m3 with x_scale (N, 1) -> (N, out) bf16."""
        # weight.t() is the column-major (in, out) operand the FP8 kernels want.
        return torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale, scale_b=self.scale,
                                bias=self.bias, out_dtype=torch.bfloat16)


@dataclass
class Fp8Block:
    c_attn: Fp8Linear
    attn_proj: Fp8Linear
    c_fc: Fp8Linear
    mlp_proj: Fp8Linear


def prepare(model) -> list[Fp8Block]:
    """The FP8 weights of every block of `model` (a GPT2Model), made once at load."""
    return [Fp8Block(Fp8Linear.of(b.attn.c_attn), Fp8Linear.of(b.attn.c_proj),
                     Fp8Linear.of(b.mlp.c_fc), Fp8Linear.of(b.mlp.c_proj)) for b in model.h]


# -- quantising, in torch (the reference, and the CPU's path) --------------------------------

def quantize_rows_torch(x: torch.Tensor, gelu: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, (N, 1) float32 scales) of x (or of GELU(x)), each row scaled to its amax."""
    x = x.float()
    if gelu:
        x = F.gelu(x, approximate="tanh")
    scale = (x.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def add_layer_norm_quantize_torch(x, delta, norm):
    total = x + delta
    h = F.layer_norm(total.float(), norm.normalized_shape, norm.weight.float(),
                     norm.bias.float(), norm.eps)
    return (total, *quantize_rows_torch(h))


if triton is not None:

    @triton.jit(do_not_specialize=["n_rows"])
    def _quantize_kernel(x_ptr, q_ptr, scale_ptr, n_rows, n_cols, GELU: tl.constexpr,
                         BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]).to(tl.int64)
        cols = tl.arange(0, BLOCK)[None, :]
        inside = (rows < n_rows) & (cols < n_cols)
        offsets = rows * n_cols + cols
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if GELU:
            # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp -> inf gives 1).
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        scale = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)
        q = tl.clamp(x / scale[:, None], -448.0, 448.0)
        tl.store(q_ptr + offsets, q.to(q_ptr.dtype.element_ty), mask=inside)
        tl.store(scale_ptr + rows, scale[:, None], mask=rows < n_rows)


def _rows_per_program(n_cols: int) -> int:
    return max(1, 4096 // triton.next_power_of_2(n_cols))


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_torch` in one Triton kernel on a GPU."""
    if not fused.fused_available(x):
        return quantize_rows_torch(x, gelu)
    x = x.contiguous()
    n_rows, n_cols = x.shape
    q = torch.empty((n_rows, n_cols), dtype=FP8, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    rows = _rows_per_program(n_cols)
    _quantize_kernel[(triton.cdiv(n_rows, rows),)](
        x, q, scale, n_rows, n_cols, GELU=gelu, BLOCK=triton.next_power_of_2(n_cols),
        ROWS=rows, num_warps=8 if n_cols > 1024 else 4)
    return q, scale


def add_layer_norm_quantize(x: torch.Tensor, delta: torch.Tensor, norm: nn.LayerNorm):
    """(x + delta, e4m3 rows of norm(x + delta), their (N, 1) scales), in one pass on a GPU."""
    if not fused.fused_available(x):
        return add_layer_norm_quantize_torch(x, delta, norm)
    x, delta = x.contiguous(), delta.contiguous()
    n_rows, n_cols = x.shape
    total = torch.empty_like(x)
    q = torch.empty((n_rows, n_cols), dtype=FP8, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    rows = fused.ROWS_PER_PROGRAM
    fused._add_layer_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, delta, norm.weight, norm.bias, total, q, scale, n_rows, n_cols, norm.eps,
        BLOCK=triton.next_power_of_2(n_cols), ROWS=rows, QUANTIZE=True, num_warps=4)
    return total, q, scale


# -- the forward ------------------------------------------------------------------------------

def embed_packed(model, blocks: list[Fp8Block], layout, pooling: str | None = None
                 ) -> torch.Tensor:
    """`GPT2Model.embed_packed` with the linear layers in FP8: (B, D) unit vectors."""
    from pipeline.model.gpt2 import pool_packed

    x = model.wte(layout.ids) + model.wpe(layout.positions.long())  # (N, C) bf16
    causal = model.config.attention == "causal"
    layout.build_window_mask(causal)
    N, C = x.shape
    h_q, h_scale = quantize_rows(model.h[0].ln_1(x))
    for i, (block, fp8) in enumerate(zip(model.h, blocks, strict=True)):
        qkv = fp8.c_attn(h_q, h_scale).view(N, 3, block.attn.n_head, C // block.attn.n_head)
        y_q, y_scale = quantize_rows(block.attn.attend_packed(qkv, layout, causal))
        x, h_q, h_scale = add_layer_norm_quantize(x, fp8.attn_proj(y_q, y_scale), block.ln_2)
        g_q, g_scale = quantize_rows(fp8.c_fc(h_q, h_scale), gelu=True)
        delta = fp8.mlp_proj(g_q, g_scale)
        if i + 1 < len(blocks):
            x, h_q, h_scale = add_layer_norm_quantize(x, delta, model.h[i + 1].ln_1)
        else:  # the last block: the final LayerNorm, in bf16 for pooling
            x, h = fused.add_layer_norm(x, delta, model.ln_f)
    pooled = pool_packed(h, layout.seq, layout.positions, layout.starts, layout.lengths,
                         pooling or model.config.pooling)
    if model.proj is not None:
        pooled = model.proj(pooled.to(model.proj.weight.dtype))
    return F.normalize(pooled.float(), dim=-1)


def compile_for(device: torch.device, n_cols: int) -> None:
    """Compile this module's kernels for `n_cols`-wide rows (and 4x for the MLP) now."""
    with torch.cuda.device(device):
        x = torch.zeros(fused.ROWS_PER_PROGRAM, n_cols, device=device, dtype=torch.bfloat16)
        norm = nn.LayerNorm(n_cols, device=device, dtype=torch.bfloat16)
        add_layer_norm_quantize(x, x, norm)
        quantize_rows(x)
        quantize_rows(torch.zeros(1, 4 * n_cols, device=device, dtype=torch.bfloat16), gelu=True)
        torch.cuda.synchronize()
