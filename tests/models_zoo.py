"""Random-initialised models of the geometries the tests cover, cached per process."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def _make(name: str, dtype: torch.dtype):
    torch.manual_seed(1234)
    if name.startswith("open_clip:"):
        import open_clip
        model = open_clip.create_model(name.split(":", 1)[1], pretrained=None)
    else:
        import timm
        model = timm.create_model(name, pretrained=False)
    return model.eval().to(dtype)


# name -> (model name, a small non-square input size (H, W))
MODELS = {
    "clip_b32": ("vit_base_patch32_clip_224", (64, 96)),
    "dino_s16": ("vit_small_patch16_224", (48, 64)),
    "dinov2_s14_reg": ("vit_small_patch14_reg4_dinov2", (56, 42)),
    "open_clip_b32": ("open_clip:ViT-B-32", (96, 64)),
}


def get(key: str, dtype: torch.dtype = torch.float64):
    name, size = MODELS[key]
    return _make(name, dtype), size


def images(size, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g).to(dtype)
