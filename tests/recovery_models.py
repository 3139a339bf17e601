"""Test models whose consumers need every token (random weights, tiny):

* :class:`SegViT`: a timm ViT encoder and a conv decoder over the reshaped 4×4 patch grid
  (a segmentation / saliency head); :class:`SegViTDPT` reaches the grid through a transpose;
* :class:`PoseTransformer`: a video pose transformer in the style of the Hourglass Tokenizer:
  frames are tokens (2-D joints in, 3-D joints out per frame), no CLS token.
"""
from __future__ import annotations

import torch
from torch import nn

IMG, GRID, DIM = 32, 4, 64


class SegViT(nn.Module):
    """x [B, 3, 32, 32] -> per-patch logits [B, 5, 4, 4]."""

    def __init__(self):
        super().__init__()
        import timm

        self.encoder = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=IMG, patch_size=8,
                                         depth=3, embed_dim=DIM, num_heads=4, num_classes=0).eval()
        self.decoder = nn.Sequential(nn.Conv2d(DIM, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 5, 1))

    def tokens(self, x):
        """The encoder's output tokens [B, 1 + 16, C]."""
        return self.encoder.forward_features(x)

    def decode(self, tokens):
        grid = tokens[:, 1:].reshape(-1, GRID, GRID, DIM).permute(0, 3, 1, 2)
        return self.decoder(grid)

    def forward(self, x):
        return self.decode(self.tokens(x))


class SegViTDPT(SegViT):
    """SegViT with the decoder reading the grid as DINOv2/DPT heads export it: drop CLS, then
    tokens [B, N, C] -> transpose [B, C, N] -> reshape [B, C, H, W] (the same function)."""

    def decode(self, tokens):
        patches = tokens[:, 1:]
        grid = patches.transpose(1, 2).reshape(patches.shape[0], DIM, GRID, GRID)
        return self.decoder(grid)


class PoseTransformer(nn.Module):
    """2-D joints per frame [B, F, J·2] -> 3-D joints per frame [B, F, J·3]."""

    def __init__(self, frames: int = 27, joints: int = 17, dim: int = DIM, depth: int = 4):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(joints * 2, dim)
        self.pos = nn.Parameter(torch.randn(1, frames, dim) * 0.5)
        self.blocks = nn.Sequential(*[Block(dim, 4) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, joints * 3)

    def features(self, x):
        """The tokens after the last block and the norm [B, F, C]."""
        return self.norm(self.blocks(self.embed(x) + self.pos))

    def forward(self, x):
        return self.head(self.features(x))


def seg_vit():
    torch.manual_seed(0)
    return SegViT().eval(), {"x": torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))}


def seg_vit_dpt():
    torch.manual_seed(0)
    return SegViTDPT().eval(), {"x": torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))}


def pose_transformer():
    torch.manual_seed(0)
    return PoseTransformer().eval(), {"x": torch.randn(2, 27, 34, generator=torch.Generator().manual_seed(0))}
