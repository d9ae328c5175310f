"""Reference networks written with the key names of torchvision, timm and the official DS-Net code.

Neither library is needed: these are small re-implementations of the layouts
the importers read, to check that an import reproduces the source network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and statistics (fresh ones are 1/0 and would hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


# ------------------------------------------------------------------------------------- torchvision ResNet
class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TVResNet(nn.Module):
    """torchvision.models.ResNet's layout and key names (ImageNet stem, or a 3x3 "cifar" stem)."""

    def __init__(
        self,
        block: type,
        layers: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        planes: tuple[int, ...] = (64, 128, 256, 512),
        stem_width: int = 64,
        cifar_stem_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.inplanes = stem_width
        if cifar_stem_stride is None:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, cifar_stem_stride, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        for i, (n, p) in enumerate(zip(layers, planes)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, p, n, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[len(layers) - 1] * block.expansion, num_classes)
        self.num_layers = len(layers)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------- timm DeiT
class TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (dim // self.heads) ** -0.5) @ k.transpose(-2, -1)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n, length, dim)
        return self.proj(out)


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """timm's VisionTransformer (DeiT) layout and key names: class token, pre-norm blocks, token pooling."""

    def __init__(self, img_size: int, patch: int, dim: int, heads: int, depth: int, num_classes: int = 1000) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ---------------------------------------------------------------------------------- official DS-Net
class OfficialBN(nn.Module):
    """dyn_slim's DSBatchNorm2d: statistics per width (``aux_bn.i``), affine on the widest only."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.widths = list(widths)
        self.aux_bn = nn.ModuleList([nn.BatchNorm2d(w, affine=False) for w in widths[:-1]])
        self.aux_bn.append(nn.BatchNorm2d(widths[-1]))

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        stats, affine = self.aux_bn[self.widths.index(c)], self.aux_bn[-1]
        return F.batch_norm(
            x, stats.running_mean, stats.running_var, affine.weight[:c], affine.bias[:c], False, 0.0, affine.eps
        )


class OfficialGate(nn.Module):
    """dyn_slim's MultiHeadGate: squeeze-excitation with 1x1 convs, and a gate head where ``has_gate``."""

    def __init__(self, widths: list[int], has_gate: bool) -> None:
        super().__init__()
        reduced = int(widths[-1] * 0.25 + 0.5)
        self.conv_reduce = nn.Conv2d(widths[-1], reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, widths[-1], 1)
        if has_gate:
            self.gate = nn.Sequential(nn.Conv2d(reduced, 4, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        z = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), self.conv_reduce.weight[:, :c], self.conv_reduce.bias))
        return x * torch.sigmoid(F.conv2d(z, self.conv_expand.weight[:c], self.conv_expand.bias[:c]))


class OfficialBlock(nn.Module):
    """dyn_slim's DSDepthwiseSeparable without skip (DS-MobileNetV1)."""

    def __init__(self, in_widths: list[int], out_widths: list[int], stride: int, has_gate: bool) -> None:
        super().__init__()
        c = in_widths[-1]
        self.conv_dw = nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)
        self.bn1 = OfficialBN(in_widths)
        self.gate = OfficialGate(in_widths, has_gate)
        self.conv_pw = nn.Conv2d(c, out_widths[-1], 1, bias=False)
        self.bn2 = OfficialBN(out_widths)

    def forward(self, x: Tensor, out_width: int) -> Tensor:
        c = x.shape[1]
        dw = self.conv_dw
        x = F.silu(self.bn1(F.conv2d(x, dw.weight[:c], None, dw.stride, 1, 1, c)))
        x = self.gate(x)
        return F.silu(self.bn2(F.conv2d(x, self.conv_pw.weight[:out_width, :c])))


class OfficialStage(nn.Module):
    def __init__(self, in_widths: list[int], out_widths: list[int], depth: int, stride: int, has_gate: bool) -> None:
        super().__init__()
        self.first_block = OfficialBlock(in_widths, out_widths, stride, has_gate)
        self.residual_blocks = nn.Sequential(
            *[OfficialBlock(out_widths, out_widths, 1, False) for _ in range(depth - 1)]
        )


class OfficialDSNet(nn.Module):
    """slimmable_mbnet_v1_bn_uniform's key names and its 'largest' / 'uniform' modes.

    ``forward(x, choice)``: ``choice=-1`` is the largest network; ``choice=i``
    the uniform sub-network ``i`` (stem and the first three stages at their
    first width, the last two at their ``i``-th).
    """

    def __init__(
        self, stem: list[int], stages: list[tuple[list[int], int, int, bool]], num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.stem_widths = stem
        self.conv_stem = nn.Conv2d(3, stem[-1], 3, 2, 1, bias=False)
        self.bn1 = OfficialBN(stem)
        self.blocks = nn.ModuleList()
        self.stage_widths = []
        prev = stem
        for widths, depth, stride, has_gate in stages:
            self.blocks.append(OfficialStage(prev, widths, depth, stride, has_gate))
            self.stage_widths.append(widths)
            prev = widths
        self.classifier = nn.Linear(prev[-1], num_classes)

    def forward(self, x: Tensor, choice: int = -1) -> Tensor:
        width = self.stem_widths[-1 if choice == -1 else 0]
        x = F.silu(self.bn1(F.conv2d(x, self.conv_stem.weight[:width], None, 2, 1)))
        for idx, (stage, widths) in enumerate(zip(self.blocks, self.stage_widths)):
            w = widths[-1 if choice == -1 else (choice if idx >= 3 else 0)]
            x = stage.first_block(x, w)
            for block in stage.residual_blocks:
                x = block(x, w)
        c = x.shape[1]
        return F.linear(x.mean((2, 3)), self.classifier.weight[:, :c], self.classifier.bias)
