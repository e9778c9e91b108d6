"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Written as Meta's ``segment_anything/modeling/transformer.py`` (same classes, parameter names
and order of operations), with one difference: the image side may have batch 1 while the
prompt side has N prompts. Batches broadcast instead of the image embedding being copied N
times, so what depends on the image alone (the first layer's image-side projections) is
computed once; the values are SAM's.
"""

from __future__ import annotations

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
    """SAM's attention layer: project q/k/v (optionally to ``embedding_dim // downsample_rate``
    channels), split heads, scaled dot-product softmax, recombine heads, project out."""

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

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # B x h x N x d

    def _recombine_heads(self, x: Tensor) -> Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (Bq, Nq, C), k/v: (Bk, Nk, C) with Bq, Bk equal or 1 -> (max(Bq, Bk), Nq, C)."""
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))
        batch = max(q.shape[0], k.shape[0])
        # softmax(q k^T / sqrt(d)) v; scaled_dot_product_attention wants equal batches
        out = F.scaled_dot_product_attention(
            q.expand(batch, -1, -1, -1), k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        )
        return self.out_proj(self._recombine_heads(out))


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

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """queries: (N, T, C) prompt tokens; keys: (1 or N, HW, C) image tokens."""
        # Self attention block
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # Cross attention block, tokens attending to image embedding
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        # MLP block
        queries = self.norm3(queries + self.mlp(queries))

        # Cross attention block, image embedding attending to tokens
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
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
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
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
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)  # B x HW x C
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)

        # Final attention layer from the points to the image
        q = queries + point_embedding
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        # one prompt, or depth 0: the image side may still have batch 1
        return queries, keys.expand(queries.shape[0], -1, -1)
