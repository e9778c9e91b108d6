"""SAM's mask decoder: a two-way transformer plus upscaling and hypernetwork mask heads.

Written as Meta's ``segment_anything/modeling/mask_decoder.py`` (parameter names, order of
operations). Two differences leave the outputs unchanged: the image embedding is broadcast to
the prompts instead of copied once per prompt, and only the requested masks (1 single or 3
multimask) go through the hypernetwork product. Faster inference paths live in ``accel/``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LayerNorm2d
from .transformer import TwoWayTransformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (``layers.i`` as in SAM)."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        act_layer: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        """
        Args:
          transformer_dim: channel width of the transformer (256).
          transformer: the two-way transformer.
          num_multimask_outputs: masks predicted for ambiguous prompts (3); one more token
            predicts the single-mask output.
          act_layer: activation of the upscaling path.
          iou_head_depth / iou_head_hidden_dim: the mask-quality MLP.
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4, eps=1e-6),
            act_layer(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            act_layer(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
          image_embeddings: (1 or N, C, 64, 64); batch 1 is shared by all N prompts.
          image_pe: (1, C, 64, 64).
          sparse_prompt_embeddings: (N, T, C).
          dense_prompt_embeddings: (N, C, 64, 64) or broadcastable to it.
          multimask_output: return the 3 multimask outputs instead of the single one.
        Returns:
          low-res mask logits (N, M, 256, 256) and IoU predictions (N, M), M = 3 or 1.
        """
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, mask_slice
        )

    def prompt_tokens(self, sparse_prompt_embeddings: Tensor) -> Tensor:
        """The transformer's token input: IoU token, mask tokens, then the prompt's sparse
        embeddings (N, T, C) -> (N, 1 + num_mask_tokens + T, C)."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype).unsqueeze(0).expand(n, -1, -1)
        return torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        mask_slice: slice = slice(None),
    ) -> tuple[Tensor, Tensor]:
        """All-token variant of ``forward``; ``mask_slice`` picks which mask tokens to decode."""
        iou_pred, mask_tokens_out, src, grid = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        masks = self.mask_head(src, grid, mask_tokens_out, range(self.num_mask_tokens)[mask_slice])
        return masks, iou_pred[:, mask_slice]

    def run_transformer(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """``predict_masks`` up to the mask head: the two-way transformer and the IoU head.

        Returns IoU predictions (N, num_mask_tokens), the output mask tokens (N, num_mask_tokens,
        C), the final image tokens (N, H*W, C) and their grid (H, W).
        """
        tokens = self.prompt_tokens(sparse_prompt_embeddings)
        # (1 or N, C, H, W): broadcast to the prompts, not copied per prompt
        src = image_embeddings + dense_prompt_embeddings
        grid = (src.shape[-2], src.shape[-1])
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        return self.iou_prediction_head(iou_token_out), mask_tokens_out, src, grid

    def mask_head(
        self, src: Tensor, grid: tuple[int, int], mask_tokens_out: Tensor, indices: Sequence[int]
    ) -> Tensor:
        """Upscaling + hypernetwork product: the transformer's image tokens (N, H*W, C) on the
        (H, W) ``grid`` and its mask tokens (N, num_mask_tokens, C) -> logits
        (N, len(indices), 4H, 4W) of the mask tokens ``indices``."""
        src = src.transpose(1, 2).reshape(src.shape[0], src.shape[2], *grid)
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in indices], dim=1
        )
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
