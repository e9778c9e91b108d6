"""The promptable segmentation model shared by EfficientViT-SAM and SAM.

``Sam`` owns an image encoder, SAM's prompt encoder and SAM's mask decoder, and knows the two
frames involved: the encoder sees images resized (longest side) and padded to ``input_size``
(512 for L*, 1024 for XL* and SAM), while prompts and masks live in SAM's 1024 frame
(``prompt_size``), as in the official EfficientViT-SAM. LiteMedSAM works in a 256 frame for
both. How pixels are resized and normalised is the model's ``preprocessing`` (``data/frames.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.frames import (
    LOW_RES_SIZE,
    MINMAX_EPS,
    PIXEL_MEAN,
    PIXEL_STD,
    PREPROCESSING,
    PROMPT_SIZE,
    check_preprocessing,
    preprocess_shape,
    resize_longest,
)
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer

__all__ = ["LOW_RES_SIZE", "PIXEL_MEAN", "PIXEL_STD", "PROMPT_SIZE", "Sam", "build_sam_head"]


class Sam(nn.Module):
    mask_threshold: float = 0.0

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        input_size: int,
        name: str = "",
        family: str = "efficientvit-sam",
        prompt_size: int = PROMPT_SIZE,
        preprocessing: str = "sam",
    ) -> None:
        """
        Args:
          image_encoder: (B, 3, input_size, input_size) -> (B, 256, 64, 64).
          prompt_encoder, mask_decoder: SAM's.
          input_size: side of the square, padded encoder input.
          name: registry name (saved with checkpoints).
          family: "efficientvit-sam", "sam" or "tiny-vit-sam"; decides the checkpoint key layout.
          prompt_size: side of the frame prompts and upscaled masks are expressed in.
          preprocessing: "sam" (bilinear resize, pixel mean/std) or "minmax-area" (LiteMedSAM:
            area resize, min-max to [0, 1] per image); see ``data.frames.PREPROCESSING``.
        """
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.input_size = int(input_size)
        self.prompt_size = int(prompt_size)
        self.name = name
        self.family = family
        self.preprocessing = check_preprocessing(preprocessing)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)
        self.pixel_mean: Tensor
        self.pixel_std: Tensor

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ image side
    @property
    def interpolation(self) -> str:
        """How images are resized for the encoder: "bilinear" or "area"."""
        return PREPROCESSING[self.preprocessing]

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> resized so the longest side is ``input_size`` (``interpolation``)."""
        return resize_longest(image, self.input_size, self.interpolation)

    def normalize_and_pad(self, images: Tensor) -> Tensor:
        """(B, 3, h, w) float pixels in [0, 255], resized already -> normalised (mean/std, or
        min-max over each whole image) and zero-padded to input_size."""
        if self.preprocessing == "sam":
            images = (images - self.pixel_mean) / self.pixel_std
        else:
            low = images.amin(dim=(1, 2, 3), keepdim=True)
            high = images.amax(dim=(1, 2, 3), keepdim=True)
            images = (images - low) / (high - low).clamp(min=MINMAX_EPS)
        h, w = images.shape[-2:]
        return F.pad(images, (0, self.input_size - w, 0, self.input_size - h))

    def preprocess(self, image: np.ndarray) -> Tensor:
        """HxWx3 uint8 RGB -> (1, 3, input_size, input_size) encoder input on the model's device,
        prepared as ``preprocessing`` says (the numpy twin is ``data.frames.preprocess_image``)."""
        resized = self.resize_image(image)
        x = torch.from_numpy(np.array(resized, dtype=np.uint8, copy=True)).to(self.device)
        x = x.permute(2, 0, 1).unsqueeze(0).float()
        return self.normalize_and_pad(x)

    # ------------------------------------------------------------------ prompt side
    def prompt_frame_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """Size of the image inside the ``prompt_size`` frame."""
        return preprocess_shape(original_size[0], original_size[1], self.prompt_size)

    def decode(
        self,
        image_embeddings: Tensor,
        *,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Prompts in the prompt frame -> (N, M, 256, 256) logits and (N, M) IoU predictions.

        ``image_embeddings`` is (1, 256, 64, 64) shared by all N prompts, or (N, 256, 64, 64).
        """
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def postprocess_masks(
        self, masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """Low-res logits (N, M, 256, 256) -> logits at the original image size (N, M, H, W), with
        the image occupying ``input_size`` of the prompt frame: SAM's upsampling to the prompt
        frame, crop, and resize to the original size."""
        masks = F.interpolate(
            masks, (self.prompt_size, self.prompt_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, input_size={self.input_size}, prompt_size={self.prompt_size}, "
            f"preprocessing={self.preprocessing!r}"
        )

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "input_size": self.input_size,
            "prompt_size": self.prompt_size,
            "preprocessing": self.preprocessing,
        }


def build_sam_head(*, norm_eps: float, prompt_size: int = PROMPT_SIZE) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder as released (256 wide, 64x64 embedding).

    ``norm_eps`` is the transformer LayerNorm eps: 1e-5 in Meta's SAM, 1e-6 in EfficientViT-SAM
    (its registry sets every LayerNorm's eps to 1e-6). ``prompt_size`` is the side of the frame
    prompts are given in (1024; LiteMedSAM's 256).
    """
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(prompt_size, prompt_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8, norm_eps=norm_eps
        ),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder
