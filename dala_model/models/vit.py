"""The paper's ViT baseline (``vit_paper``): a 6-layer, 1024-wide ViT trained from scratch.

Its Table 7 count, 51,375,106, is reproduced exactly by the layout of lucidrains' vit-pytorch
before 1.0 (``ViT(image_size=224, patch_size=16, dim=1024, depth=6, heads=16, mlp_dim=2048)``):
a Linear patch embedding (768 -> 1024, 787,456), a CLS token (1,024) and learned positions
(197 x 1024 = 201,728), six pre-norm blocks of 8,396,800 each (LayerNorm; fused qkv Linear
1024 -> 3072 without bias; output Linear 1024 -> 1024 with bias; LayerNorm; MLP 1024 -> 2048 ->
1024 with GELU and biases) and a LayerNorm + Linear head (2,048 + 2,050). From 1.0 that library
adds LayerNorms around the patch embedding (3,584 more), which is why the pre-1.0 layout is the one.

No ImageNet weights exist for this layout, so the paper's ViT trained from scratch and this one
refuses ``pretrained=True`` (``vit_b_16`` is the pretrained ViT). Patches are flattened in
vit-pytorch's ``(p1 p2 c)`` order, so its state dicts map onto ours by renaming keys only.
Parameters start as torchvision's ViT does (positions N(0, 0.02), CLS token zero) rather than
vit-pytorch's N(0, 1), which is too large beside the patch embeddings for training from scratch.

At 224 px the 14x14 position grid is used as is; other sizes (any multiple of 16) get the grid
resampled bicubically, as timm's ``dynamic_img_size`` does, so the parameter count never changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dala_model.models._spec import ModelSpec, check_dropout, finish
from dala_model.paper import PAPER_PARAMS

INPUT_SIZE = 224
PATCH = 16


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free fused qkv projection and a biased output one."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PaperViT(nn.Module):
    """Linear patch embedding + CLS token + learned positions -> pre-norm blocks -> CLS head."""

    def __init__(
        self,
        num_classes: int = 2,
        *,
        image_size: int = INPUT_SIZE,
        patch: int = PATCH,
        dim: int = 1024,
        depth: int = 6,
        heads: int = 16,
        mlp_dim: int = 2048,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.grid = image_size // patch
        self.patch_embed = nn.Linear(3 * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.grid**2, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """The CLS + grid position embeddings for a ``rows`` x ``cols`` patch grid."""
        if (rows, cols) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, size=(rows, cols), mode="bicubic", align_corners=False, antialias=True
        )
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        p = self.patch
        if height % p or width % p:
            raise ValueError(
                f"vit_paper takes images whose sides are multiples of its {p} px patches "
                f"(the paper's {INPUT_SIZE}x{INPUT_SIZE}), got {height}x{width}"
            )
        rows, cols = height // p, width // p
        # (b, c, h*p, w*p) -> (b, h*w, p*p*c): vit-pytorch's "(p1 p2 c)" patch order.
        patches = x.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
        tokens = self.patch_embed(patches.reshape(batch, rows * cols, p * p * channels))
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        tokens = self.blocks(self.dropout(tokens + self.positions(rows, cols)))
        return self.head(self.norm(tokens[:, 0]))


def vit_paper(
    *, num_classes: int = 2, pretrained: bool | str = False, dropout: float = 0.0
) -> nn.Module:
    """The paper's 6-layer ViT: exactly 51,375,106 parameters with 2 classes; no ImageNet weights."""
    if pretrained is True:
        raise ValueError(
            "vit_paper has no pretrained weights: the paper's 6-layer ViT trains from scratch "
            "(no ImageNet weights exist for this layout). Use vit_b_16 for an ImageNet-pretrained "
            "ViT, or pass a state dict of this architecture as pretrained='<path or URL>'"
        )
    check_dropout("vit_paper", dropout)
    model = PaperViT(num_classes, dropout=dropout)
    return finish(model, VIT_PAPER, num_classes, pretrained, {"dropout": dropout})


VIT_PAPER = ModelSpec(
    name="vit_paper",
    builder=vit_paper,
    source="torch",
    paper_params=PAPER_PARAMS["vit_paper"],
    input_size=INPUT_SIZE,
    preset="paper",
    weights=None,
    fresh=("head",),
    # The last block's first LayerNorm: (N, 1 + h*w, 1024) tokens, CLS first (see ModelSpec).
    cam_layer="blocks.5.norm1",
    cam_reshape="vit_tokens",
    note="the paper's ViT (6 layers, dim 1024, 16 heads, MLP 2048; vit-pytorch before 1.0), "
    "trained from scratch; other sizes than 224 resample its position grid",
)

SPECS = (VIT_PAPER,)
