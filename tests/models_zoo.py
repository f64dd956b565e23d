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


# Hugging Face vision models: small random configs of each supported class (issue 15).
# key -> (transformers model class, config class, config overrides, a small non-square input size (H, W))
_HF_SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
                 patch_size=8)
HF_MODELS = {
    "hf_vit": ("ViTModel", "ViTConfig", {}, (40, 24)),
    "hf_deit": ("DeiTModel", "DeiTConfig", {}, (24, 40)),
    "hf_dinov2": ("Dinov2Model", "Dinov2Config", dict(mlp_ratio=2, layerscale_value=0.5), (40, 32)),
    "hf_dinov2_swiglu": ("Dinov2Model", "Dinov2Config", dict(mlp_ratio=2, use_swiglu_ffn=True), (32, 40)),
    "hf_dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                      dict(mlp_ratio=2, num_register_tokens=3, layerscale_value=0.5), (40, 24)),
    "hf_clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(hidden_act="quick_gelu"), (24, 40)),
    "hf_clip": ("CLIPModel", "CLIPConfig", {}, (40, 32)),
    "hf_siglip": ("SiglipVisionModel", "SiglipVisionConfig", dict(hidden_act="gelu_pytorch_tanh"), (40, 24)),
}
#: P of each (CLS; CLS + distillation; CLS + 3 registers; none for SigLIP)
HF_PREFIX_TOKENS = {"hf_vit": 1, "hf_deit": 2, "hf_dinov2": 1, "hf_dinov2_swiglu": 1, "hf_dinov2_reg": 4,
                    "hf_clip_vision": 1, "hf_clip": 1, "hf_siglip": 0}


def make_hf(key: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A fresh random model of ``HF_MODELS[key]`` (seeded: the same weights every call) and its input size."""
    import transformers
    model_cls, config_cls, overrides, size = HF_MODELS[key]
    if config_cls == "CLIPConfig":
        config = transformers.CLIPConfig(
            vision_config=dict(_HF_SMALL, hidden_act="quick_gelu"),
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    else:
        config = getattr(transformers, config_cls)(**dict(_HF_SMALL, **overrides))
    torch.manual_seed(1234)
    model = getattr(transformers, model_cls)._from_config(config, attn_implementation=attn_implementation)
    _perturb_inits(model)
    return model.eval().to(dtype), size


def _perturb_inits(model: torch.nn.Module) -> None:
    """Random values for what HF initialises to constants (LayerNorm, biases, tokens, layer scales), so that
    every parameter matters in the exactness tests."""
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 or "token" in name or "position" in name or "class_embedding" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@functools.lru_cache(maxsize=None)
def get_hf(key: str, dtype: torch.dtype = torch.float64):
    """Cached ``make_hf`` (do not modify the returned model)."""
    return make_hf(key, dtype)
