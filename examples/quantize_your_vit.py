"""Quantize a ViT the plugin did not write to an integer-only model, by torch.ao FX and by torchao PT2E.

    .venv/bin/python examples/quantize_your_vit.py [--size 64] [--hugging-face]

The model is an ordinary timm-style ViT classifier written below (or, with ``--hugging-face``,
transformers' ``ViTModel`` from a small config); its weights are random, the images are real: the
scikit-image photos that `make test` / `make demo` install. Both front ends calibrate on all photos
but the last, convert to a model that takes uint8 RGB pixels, and run the last photo. The script prints
how many float ops ran (0), the logits' cosine similarity to the float model, and whether the two
front ends gave the same integers.
"""
from __future__ import annotations

import argparse

import mmcv
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

import fx_patterns as fxp
from iseg_plugin.demo import packaged_photos
from iseg_plugin.deploy import OpAudit

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # ImageNet, in pixels


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # FX keeps this a float op: see main()
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ExplicitAttention(Attention):
    """The same attention written out, as FX needs it (torch.export decomposes SDPA by itself)."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention=Attention):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MyViT(nn.Module):
    def __init__(self, size: int, patch: int = 8, dim: int = 96, heads: int = 3, depth: int = 4, classes: int = 10,
                 attention=Attention):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, attention) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class HuggingFaceViT(nn.Module):
    """transformers' ViTModel (its forward returns a ModelOutput): the cls token's features."""

    def __init__(self, size: int):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
                           image_size=size, patch_size=8)
        self.vit = ViTModel(config, add_pooling_layer=False)

    def forward(self, pixel_values):
        return self.vit(pixel_values=pixel_values).last_hidden_state[:, 0]


def photos(size: int) -> torch.Tensor:
    """The packaged photos as uint8 RGB, ``size`` x ``size``."""
    images = [mmcv.imresize(mmcv.imread(str(p), channel_order="rgb"), (size, size)) for p in packaged_photos()]
    return torch.stack([torch.from_numpy(img).permute(2, 0, 1) for img in images])


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def integer_model(prepared, calibration: torch.Tensor, example: torch.Tensor):
    with torch.no_grad():
        for image in calibration:
            prepared(image[None])
    return fxp.convert(prepared, (example,), pixels=dict(mean=MEAN, std=STD))


def report(name: str, model: nn.Module, int_model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), OpAudit() as audit:
        out = int_model(pixels)
    with torch.no_grad():
        ref = model(normalised(pixels))
    cosine = F.cosine_similarity(out.double().flatten() * int_model.output_scales[0], ref.double().flatten(), 0)
    print(f"{name:>5}: {len(audit.records)} ops ran, {len(audit.float_ops())} of them float; output "
          f"{out.dtype}, cosine to the float model {float(cosine):.4f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--hugging-face", action="store_true", help="transformers' ViTModel instead of MyViT")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = photos(args.size)
    calibration, test = normalised(images[:-1]), images[-1:]
    example = calibration[:1]

    model = (HuggingFaceViT(args.size) if args.hugging_face else MyViT(args.size)).eval()
    exported = torch.export.export(model, (example,)).module()
    by_pt2e = integer_model(prepare_pt2e(exported, fxp.ISegQuantizer()), calibration, example)
    out_pt2e = report("PT2E", model, by_pt2e, test)

    if not args.hugging_face:  # (transformers' models are not FX-traceable: torch.export is their route)
        # FX does not look inside scaled_dot_product_attention: converting MyViT as it is is refused, by node.
        try:
            integer_model(fxp.prepare(model, (example,)), calibration, example)
        except fxp.LoweringError as err:
            print(f"   FX: MyViT refused: {str(err)[:150]}...")
        fx_model = MyViT(args.size, attention=ExplicitAttention).eval()
        fx_model.load_state_dict(model.state_dict())
        by_fx = integer_model(fxp.prepare(fx_model, (example,)), calibration, example)
        out_fx = report("FX", fx_model, by_fx, test)
        print(f"FX and PT2E give the same integers: {torch.equal(out_fx, out_pt2e)}")


if __name__ == "__main__":
    main()
