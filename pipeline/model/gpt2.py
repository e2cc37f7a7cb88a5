"""A GPT-2 encoder in PyTorch, nanoGPT-style: attention, MLP, block, model, pooling, and the
packed layout of the GPU path (PackedLayout, pool_packed).

Parameter names follow Hugging Face's ``GPT2Model`` (``wte``, ``wpe``, ``h.{i}.attn.c_attn``,
...), so checkpoint.py reads and writes standard GPT-2 checkpoint folders with little renaming.

Only what embeddings need is here: no LM head, KV cache or dropout at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import POOLINGS, GPT2Config
from pipeline.model.fused import add_layer_norm


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=causal and attn_mask is None)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


    def forward_packed(self, x: torch.Tensor, layout: PackedLayout, causal: bool
                       ) -> torch.Tensor:
        """x (N, C): many sequences in the slots of `layout` (CUDA; CPU for tests).

        Short sequences share 128-token windows: one dense attention over all windows, a
        block-diagonal mask keeping each sequence to itself. The longer ones lie back to
        back after the windows, for flash attention's variable-length kernel. (That kernel
        alone works in 128-row tiles per sequence, mostly empty for a 46-token one: on the
        bench corpus, windows took attention from 0.74 to 0.35 ms a layer, H200.)
        """
        N, C = x.shape
        qkv = self.c_attn(x).view(N, 3, self.n_head, C // self.n_head)
        return self.c_proj(self.attend_packed(qkv, layout, causal))

    def attend_packed(self, qkv: torch.Tensor, layout: PackedLayout, causal: bool
                      ) -> torch.Tensor:
        """(N, 3, nh, hs) q, k, v of `layout`'s slots -> (N, C) attention outputs, before
        c_proj (the FP8 path, model/fp8.py, quantises them in between)."""
        N, _, nh, hs = qkv.shape
        nw = layout.window_tokens
        if nw == N:  # no long sequence
            return self.window_attention(qkv, layout).reshape(N, nh * hs)
        y = varlen_attention(*qkv[nw:].unbind(1), layout.long_cu, layout.long_max, causal)
        if nw:
            # Both parts into one buffer (cheaper than concatenating): the long part's rows
            # are copied, the windows' are written by the transposing copy they need anyway.
            out = torch.empty((N, nh, hs), dtype=y.dtype, device=y.device)
            out[nw:] = y
            out[:nw].view(-1, layout.window, nh, hs).copy_(self.window_attention(qkv, layout))
            y = out
        return y.reshape(N, nh * hs)

    def window_attention(self, qkv: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Dense attention over the windows under their block-diagonal mask, as (W, window,
        nh, hs): the slots' order (a view; reshaping it copies)."""
        hs = qkv.shape[-1]
        q, k, v = qkv[:layout.window_tokens].view(-1, layout.window, 3, self.n_head, hs) \
            .permute(2, 0, 3, 1, 4)  # each (W, nh, window, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.window_mask)
        return y.transpose(1, 2)


def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, max_len: int, causal: bool):
    """Attention within each [cu[i], cu[i+1]) segment of (N, nh, hs) q, k, v, no padding:
    flash attention's variable-length kernel on CUDA; a loop on CPU (tests only)."""
    if q.is_cuda:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, causal, False)[0]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out[a:b] = F.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=causal).transpose(0, 1)
    return out


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        if x.dim() == 2 and x.is_cuda and not torch.is_grad_enabled():
            # The packed GPU path: bias and GELU in the matmul's epilogue (cuBLASLt's GELU is
            # the tanh form, as GPT-2's), saving a pass over the (N, 4C) activations.
            h = torch._addmm_activation(self.c_fc.bias, x, self.c_fc.weight.t(), use_gelu=True)
            return self.c_proj(h)
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask, causal: bool):
        x = x + self.attn(self.ln_1(x), attn_mask, causal)  # pre-LayerNorm, as GPT-2
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """Token ids -> last hidden states (after the final LayerNorm), and pooled embeddings."""

    def __init__(self, cfg: GPT2Config, init_weights: bool = True):
        super().__init__()
        self.config = cfg
        # Weights about to be loaded (checkpoint.load_pretrained builds this on meta): the
        # embeddings skip torch's normal_ init, which even on meta took ~0.8 s the first time.
        empty = {} if init_weights else {"_weight": torch.empty(cfg.vocab_size, cfg.n_embd)}
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd, **empty)
        empty = {} if init_weights else {"_weight": torch.empty(cfg.n_positions, cfg.n_embd)}
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd, **empty)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.proj = nn.Linear(cfg.n_embd, cfg.projection_dim) if cfg.projection_dim else None
        if not init_weights:  # weights about to be loaded: GPT-2's init would be wasted time
            return
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections (1/sqrt(2 * n_layer)).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """input_ids (B, T), right-padded; attention_mask (B, T), 1 = real token.

        Right padding keeps every real token at its true position. Under causal attention a real
        token never sees the pads after it, so no mask is needed; bidirectional attention masks
        the pads out as keys.
        """
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence of {T} tokens exceeds the context of "
                             f"{self.config.n_positions}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)  # (B, T, C)
        causal = self.config.attention == "causal"
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
            if causal:
                tri = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                keys = keys & tri
            # A pad query that sees no key would give NaN; let pads see themselves.
            attn_mask = keys | torch.eye(T, dtype=torch.bool, device=x.device)
        for block in self.h:
            x = block(x, attn_mask, causal)
        return self.ln_f(x)

    def embed_packed(self, layout: PackedLayout, pooling: str | None = None) -> torch.Tensor:
        """Sequences laid out without padding (`PackedLayout`) -> (B, D) unit vectors. The
        GPU fast path: the same function as `embed`."""
        x = self.wte(layout.ids) + self.wpe(layout.positions.long())  # (N, C)
        causal = self.config.attention == "causal"
        layout.build_window_mask(causal)
        # The blocks of `forward`, with each residual add fused into the LayerNorm after it
        # (the next sublayer's, or the final one).
        after_mlp = [block.ln_1 for block in self.h[1:]] + [self.ln_f]
        h = self.h[0].ln_1(x)
        for block, next_norm in zip(self.h, after_mlp, strict=True):
            x, h = add_layer_norm(x, block.attn.forward_packed(h, layout, causal), block.ln_2)
            x, h = add_layer_norm(x, block.mlp(h), next_norm)
        pooled = pool_packed(h, layout.seq, layout.positions, layout.starts, layout.lengths,
                             pooling or self.config.pooling)
        if self.proj is not None:
            pooled = self.proj(pooled.to(self.proj.weight.dtype))
        return F.normalize(pooled.float(), dim=-1)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              pooling: str | None = None, normalize: bool = True) -> torch.Tensor:
        """Pooled (and by default L2-normalised) sentence vectors, (B, output_dim)."""
        hidden = self(input_ids, attention_mask)
        # Pooled in fp32 whatever the weights' dtype: a bf16 sum over 256 tokens would lose
        # digits the vectors keep.
        pooled = pool(hidden.float(), attention_mask, pooling or self.config.pooling)
        if self.proj is not None:
            pooled = self.proj(pooled.to(self.proj.weight.dtype))
        return F.normalize(pooled.float(), dim=-1) if normalize else pooled


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool (B, T, C) hidden states over real tokens (mask (B, T), right-padded) to (B, C)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if method == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if method == "weighted-mean":
        # SGPT: weight token i by i+1, so later tokens, which have seen more, count more.
        w = m * torch.arange(1, hidden.shape[1] + 1, device=hidden.device,
                             dtype=hidden.dtype).view(1, -1, 1)
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1)
    if method == "last":
        last = mask.long().sum(1).clamp(min=1) - 1  # index of the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if method == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(1)
    if method == "first":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {method!r}; choose from {', '.join(POOLINGS)}")


@dataclass
class PackedLayout:
    """Where each token of a batch of sequences sits in the model's (N,) token slots.

    Slots [0, window_tokens) are windows of `window` slots, each holding whole short
    sequences back to back and unused slots (pads); the longer sequences follow back to back,
    with boundaries long_cu. Built on the host by `encoder.plan_layout`.
    """

    ids: torch.Tensor  # (N,) token id per slot (0 in a pad)
    positions: torch.Tensor  # (N,) position within its sequence
    seq: torch.Tensor  # (N,) sequence of the slot; pads: n_seq
    starts: torch.Tensor  # (n_seq,) first slot of each sequence
    lengths: torch.Tensor  # (n_seq,)
    window_tokens: int
    window: int
    long_cu: torch.Tensor  # (n_long + 1,) int32
    long_max: int
    window_mask: torch.Tensor | None = None  # (W, 1, window, window), True = may attend

    def build_window_mask(self, causal: bool) -> None:
        """Each slot attends to the slots of its own sequence (those before it, if causal);
        a pad to itself only (a query with no key would give NaN).

        A sequence's slots share their first slot, slot - position; a pad (position 0) is its
        own first slot."""
        nw = self.window_tokens
        if not nw:
            return
        first_slot = torch.arange(nw, device=self.positions.device) - self.positions[:nw]
        first_slot = first_slot.view(-1, self.window)
        mask = first_slot[:, :, None] == first_slot[:, None, :]
        if causal:
            mask &= torch.ones(self.window, self.window, dtype=torch.bool,
                               device=mask.device).tril()
        self.window_mask = mask[:, None]


def pool_packed(x: torch.Tensor, seq_of_token: torch.Tensor, positions: torch.Tensor,
                starts: torch.Tensor, lengths: torch.Tensor, method: str) -> torch.Tensor:
    """`pool` for packed (N, C) states: segment sums instead of masks. Slots whose
    seq_of_token is n_seq (pads) count for nothing; each sequence's slots are consecutive
    from starts[i]."""
    n_seq, C = lengths.numel(), x.shape[1]
    seq_of_token = seq_of_token.long()
    if method in ("mean", "weighted-mean"):
        w = (positions + 1).to(torch.float32) if method == "weighted-mean" else \
            torch.ones_like(positions, dtype=torch.float32)
        sums = torch.zeros(n_seq + 1, C, device=x.device, dtype=torch.float32)
        sums.index_add_(0, seq_of_token, x.float() * w[:, None])
        norm = torch.zeros(n_seq + 1, device=x.device).index_add_(0, seq_of_token, w)
        return (sums / norm.clamp(min=1)[:, None])[:n_seq]
    if method == "last":
        return x[starts.long() + lengths.long() - 1].float()
    if method == "first":
        return x[starts.long()].float()
    if method == "max":
        out = torch.full((n_seq + 1, C), float("-inf"), device=x.device, dtype=torch.float32)
        return out.scatter_reduce(0, seq_of_token[:, None].expand(-1, C), x.float(),
                                  "amax")[:n_seq]
    raise ValueError(f"unknown pooling {method!r}; choose from {', '.join(POOLINGS)}")
