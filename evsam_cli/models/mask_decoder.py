"""SAM's mask decoder: a two-way transformer plus upscaling and hypernetwork mask heads.

Parameter names match Meta's release. Differences from the reference that leave outputs
unchanged: the image embedding is broadcast to the prompts instead of copied once per prompt,
only the requested masks (1 single or 3 multimask) are computed, and inference on one shared
image embedding is streamed over tiles of image tokens (``streaming.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..accel.streaming import can_stream, stream_decode
from .layers import LayerNorm2d


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
        transformer: nn.Module,
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

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        mask_slice: slice = slice(None),
    ) -> tuple[Tensor, Tensor]:
        """All-token variant of ``forward``; ``mask_slice`` picks which mask tokens to decode.

        Without autograd and with one image embedding shared by all prompts (no mask inputs),
        this runs the streamed equivalent in ``streaming.py`` (same outputs up to float
        rounding, several times less memory traffic).
        """
        if can_stream(self, image_embeddings, dense_prompt_embeddings):
            return stream_decode(
                self,
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings,
                dense_prompt_embeddings,
                mask_slice,
            )
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype).unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        src = image_embeddings + dense_prompt_embeddings
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(n, c, h, w)
        upscaled = self.output_upscaling(src)
        indices = range(self.num_mask_tokens)[mask_slice]
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in indices], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)[:, mask_slice]
        return masks, iou_pred
