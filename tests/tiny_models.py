"""Tiny randomly initialised models shared by the adapter and export tests
(``tests/tiny_models.py``): timm Swin, timm LeViT (linear and conv mode), torchvision's
VisionTransformer, and non-trivial BatchNorms for CNNs. timm and torchvision are imported
where a builder needs them."""
from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm2d statistics and affines, so that folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
    return model


def tiny_swin(seed=0):
    """8x8 tokens, 4x4 windows: stage 0 has a shifted (masked) block, stage 1 follows a patch merging."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=24,
                             depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=10).eval()


def tiny_levit(seed=0, use_conv=False):
    """LeViT with a distilled head at 64 px (the 16x stem leaves 4x4 tokens, 2x2 after the
    attention downsample). timm initialises the residual BatchNorms and the attention biases
    to zero: they are randomised so that every branch carries signal."""
    from timm.models.levit import LevitDistilled

    torch.manual_seed(seed)
    m = LevitDistilled(img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3),
                       num_classes=10, use_conv=use_conv)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = mod.num_features
                mod.weight.copy_((torch.rand(c, generator=g) + 0.5) * (torch.randint(0, 2, (c,), generator=g) * 2 - 1))
                mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if hasattr(mod, "attention_biases"):
                mod.attention_biases.copy_(torch.randn(mod.attention_biases.shape, generator=g))
    return m.eval()


def tiny_torchvision_vit(seed=0):
    """torchvision VisionTransformer (nn.MultiheadAttention, packed in_proj). torchvision
    zero-initialises the classifier and the class token (a zero token makes the first
    LayerNorm amplify its quantization error; pretrained tokens are not zero): both random."""
    import torchvision

    torch.manual_seed(seed)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.2)
    nn.init.normal_(m.class_token, std=1.0)
    return m.eval()
