"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Parameter names match Meta's ``segment_anything`` release. Batches broadcast: the image side
may have batch 1 while the prompt side has N prompts, and everything computed from the image
alone (the first layer's image-side projections) is computed once instead of N times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear (``lin1``/``lin2`` as in SAM)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor, batch: int) -> Tensor:
        b, n, c = x.shape
        x = x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        return x.expand(batch, -1, -1, -1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (Bq, Nq, C), k/v: (Bk, Nk, C) with Bq, Bk broadcastable -> (max(Bq, Bk), Nq, C)."""
        batch = max(q.shape[0], k.shape[0], v.shape[0])
        return self.attend(
            self._heads(self.q_proj(q), batch),
            self._heads(self.k_proj(k), batch),
            self._heads(self.v_proj(v), batch),
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Projected heads q (B, h, Nq, d), k/v (B or 1, h, Nk, d) -> (B, Nq, C): the attention
        proper, for callers that project the keys and values once for many queries."""
        batch = q.shape[0]
        if k.shape[0] != batch:
            k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, -1, self.internal_dim))

    # The two cross attentions between a few prompt tokens (T ~ 7) and many image tokens
    # (HW = 4096) are rewritten so that no per-prompt (HW x internal_dim) projection of the image
    # side is ever formed. Both rewrites are exact algebra (equal up to float rounding):
    #   softmax(q (x Wk^T + bk)^T) = softmax((q Wk) x^T)          (q.bk is constant per row)
    #   P (x Wv^T + bv) = (P x) Wv^T + bv                         (rows of P sum to one)
    #   out_proj(P v) = P out_proj(v)                             (same reason)
    # For HW >> T this costs 2*h*T*C*HW MACs per prompt instead of ~3*HW*C*D.

    def tokens_to_image(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Prompt tokens attend to image tokens: q (N, T, C); k, v (N, HW, C) -> (N, T, C)."""
        n, t, _ = q.shape
        h, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self.q_proj(q).reshape(n, t, h, d).transpose(1, 2)  # (N, h, T, d)
        wk = self.k_proj.weight.reshape(h, d, -1)  # (h, d, C)
        wv = self.v_proj.weight.reshape(h, d, -1)
        qk = (qh @ wk).reshape(n, h * t, -1) * d**-0.5  # (N, hT, C)
        attn = torch.softmax(qk @ k.transpose(1, 2), dim=-1)  # (N, hT, HW)
        pv = (attn @ v).reshape(n, h, t, -1)  # (N, h, T, C)
        out = pv @ wv.transpose(1, 2) + self.v_proj.bias.reshape(h, 1, d)  # (N, h, T, d)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, self.internal_dim))

    def image_to_tokens(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Image tokens attend to prompt tokens: q (1 or N, HW, C); k, v (N, T, C) -> (N, HW, C)."""
        n, t, _ = k.shape
        h, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self.k_proj(k).reshape(n, t, h, d).transpose(1, 2)  # (N, h, T, d)
        vh = self.v_proj(v).reshape(n, t, h, d).transpose(1, 2)
        wq = self.q_proj.weight.reshape(h, d, -1)  # (h, d, C)
        scale = d**-0.5
        m = (wq.transpose(1, 2) @ kh.transpose(2, 3)) * scale  # (N, h, C, T)
        m = m.permute(0, 2, 1, 3).reshape(n, -1, h * t)  # (N, C, hT)
        bias = (kh @ self.q_proj.bias.reshape(h, d, 1)).reshape(n, h * t, 1) * scale
        # Logits laid out (N, hT, HW): the softmax then runs over a strided axis of length T,
        # several times faster on CPU than over a contiguous last axis of length 7.
        logits = m.transpose(1, 2) @ q.transpose(1, 2) + bias  # (N, hT, HW)
        attn = torch.softmax(logits.reshape(n, h, t, -1), dim=2).reshape(n, h * t, -1)
        wo = self.out_proj.weight.reshape(-1, h, d).transpose(0, 1)  # (h, C, d)
        u = (vh @ wo.transpose(1, 2)).reshape(n, h * t, -1)  # (N, hT, C)
        return attn.transpose(1, 2) @ u + self.out_proj.bias


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        act_layer: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act_layer)
        self.norm3 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.norm4 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def token_self_attention(self, queries: Tensor, query_pe: Tensor) -> Tensor:
        """Step 1, prompt tokens only: self-attention (+ residual unless first layer), norm1."""
        if self.skip_first_layer_pe:
            return self.norm1(self.self_attn(queries, queries, queries))
        q = queries + query_pe
        return self.norm1(queries + self.self_attn(q, q, queries))

    def token_update(self, queries: Tensor, token_to_image: Tensor) -> Tensor:
        """Steps 2-3 on the prompt tokens, given the token->image attention's output."""
        queries = self.norm2(queries + token_to_image)
        return self.norm3(queries + self.mlp(queries))

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """queries: (N, Nq, C) prompt tokens; keys: (1 or N, HW, C) image tokens."""
        queries = self.token_self_attention(queries, query_pe)
        k = keys + key_pe
        if keys.shape[0] == 1:  # image side shared by all prompts: project it once
            attn_out = self.cross_attn_token_to_image(queries + query_pe, k, keys)
        else:
            attn_out = self.cross_attn_token_to_image.tokens_to_image(queries + query_pe, k, keys)
        queries = self.token_update(queries, attn_out)

        keys = self.norm4(
            keys + self.cross_attn_image_to_token.image_to_tokens(k, queries + query_pe, queries)
        )
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a final token->image attention."""

    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        act_layer: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                act_layer=act_layer,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim, eps=norm_eps)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
          image_embedding: (1 or N, C, H, W).
          image_pe: (1, C, H, W) positional encoding of the image grid.
          point_embedding: (N, T, C) prompt tokens (output tokens included).
        Returns:
          queries (N, T, C) and keys (N, H*W, C).
        """
        image_embedding = image_embedding.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, image_pe)
        if keys.shape[0] != queries.shape[0]:  # depth 0 or a single prompt: keep the contract
            keys = keys.expand(queries.shape[0], -1, -1)
        attn = self.final_attn_token_to_image.tokens_to_image(
            queries + point_embedding, keys + image_pe, keys
        )
        queries = self.norm_final_attn(queries + attn)
        return queries, keys
