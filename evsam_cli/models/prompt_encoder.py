"""SAM's prompt encoder: points, boxes and low-resolution masks -> sparse and dense embeddings.

Parameter names match Meta's release. Point labels: 1 foreground, 0 background, -1 padding
("not a point"), 2 and 3 the top-left and bottom-right box corners (the convention of SAM's
ONNX decoder, which lets boxes travel as two labelled points).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) with a fixed random Gaussian frequency matrix."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))
        self.positional_encoding_gaussian_matrix: Tensor

    def _encode(self, coords: Tensor) -> Tensor:
        """coords in [0, 1], (..., 2) -> (..., 2 * num_pos_feats)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Encoding of the centre of every cell of an (h, w) grid -> (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """coords (..., 2) as (x, y) in pixels of an ``image_size`` (h, w) frame."""
        size = coords.new_tensor([image_size[1], image_size[0]], dtype=torch.float32)
        return self._encode(coords.float() / size)


class PromptEncoder(nn.Module):
    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        """
        Args:
          embed_dim: width of the prompt embeddings (256 for SAM).
          image_embedding_size: (H, W) of the image embedding (64, 64).
          input_image_size: (H, W) of the frame prompts are given in (1024, 1024).
          mask_in_chans: hidden channels of the mask-input downscaler.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2/3: box corners.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4, eps=1e-6),
            act_layer(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans, eps=1e-6),
            act_layer(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """(1, C, H, W) positional encoding of the image-embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """coords (N, K, 2) in the input frame, labels (N, K) in {-1, 0, 1, 2, 3} -> (N, K, C)."""
        embedding = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)  # pixel centres
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        for label, point_embed in enumerate(self.point_embeddings):
            assert isinstance(point_embed, nn.Embedding)
            embedding = embedding + (labels == label).to(embedding.dtype) * point_embed.weight
        return embedding

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes (N, 4) xyxy in the input frame -> (N, 2, C) corner embeddings."""
        corners = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([2, 3], device=boxes.device).expand(corners.shape[0], 2)
        return self.embed_points(corners, labels)

    def embed_masks(self, masks: Tensor) -> Tensor:
        """(N, 1, 256, 256) mask logits -> (N, C, 64, 64)."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
          points: coords (N, K, 2) and labels (N, K), or None.
          boxes: (N, 4) xyxy, or None.
          masks: (N, 1, 256, 256) low-res mask logits, or None.
        Returns:
          sparse (N, T, C) embeddings and dense embeddings, (N, C, 64, 64) for mask inputs and a
          broadcastable (1, C, 1, 1) "no mask" embedding otherwise.
        """
        parts: list[Tensor] = []
        if points is not None:
            coords, labels = points
            if boxes is None:
                # SAM appends one padding point when there is no box.
                coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
                labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
            parts.append(self.embed_points(coords, labels))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        if parts:
            sparse = torch.cat(parts, dim=1)
        else:
            n = masks.shape[0] if masks is not None else 1
            sparse = self.no_mask_embed.weight.new_empty(n, 0, self.embed_dim)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return sparse, dense
