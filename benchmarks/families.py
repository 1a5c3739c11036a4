"""Issue 39's acceptance harness: the ViT families people use, through each front end, on real photos.

    PYTHONPATH=. .venv/bin/python benchmarks/families.py [--families deit,swin] [--out-dir docs] [--timeout 600]

For each family a random-weight tiny model (seeded) is calibrated on the packaged photos (scikit-image's wheel,
ImageNet-normalised, batches of two) and run through each front end:

* ``pt2e``: the README's route, ``torch.export`` -> torchao ``prepare_pt2e(ISegQuantizer())`` -> calibrate ->
  ``fx_patterns.convert``;
* ``fx``: stock ``prepare_fx`` with the plugin's qconfig mapping and backend config (through ``fxp.prepare``, which
  names the module torch.fx cannot trace) -> calibrate -> ``fx_patterns.convert``;
* ``swap``: the plugin's Brevitas swap (``iseg_plugin.nn.quantize``) in float64, calibrated under Brevitas'
  ``calibration_mode``; where FX traces the model too, its integers are compared with the FX lowering's (FX prepared
  with ``gelu_grid="symmetric"``, as the swap's GELU grid is).

Each (family, front end) gets an outcome: ``integer-only`` (the OpAudit saw no float op), ``float ops`` (converted
but the audit saw float ops: a plugin bug), ``refused`` (a LoweringError naming the node and why), ``not traceable``
(torch.fx cannot trace the model), ``crash`` (any other exception: a plugin bug, listed), ``skipped``; with the
number of float ops, the cosine of the output to the float model's, the class agreement for segmenters, the share
of output integers at the limits of their integer type, and the time. Refused graphs are also scanned for every op
without an integer lowering (``blockers``), not only the first one the lowering stops at.

A family that fails does not stop the others. Writes ``docs/families.json`` and ``docs/families.md``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fx_patterns as fxp  # noqa: E402
from iseg_plugin.deploy import OpAudit  # noqa: E402
from iseg_plugin.lowering import LoweringError, static_nodes  # noqa: E402
from iseg_plugin.ops import REGISTRY  # noqa: E402

# photos of scikit-image's wheel (read as RGB): the same set as tests/test_output_grid.py, first eight
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "ihc.png", "retina.jpg")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 2
FRONT_ENDS = ("pt2e", "fx", "swap")


def photos(size: int) -> list[torch.Tensor]:
    """The packaged photos, ``size`` x ``size``, ImageNet-normalised, in batches of BATCH."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise FileNotFoundError("scikit-image's photos are not installed (`make test` installs them --no-deps)")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    images = [torch.from_numpy(np.array(Image.open(folder / name).convert("RGB").resize((size, size)))).permute(2, 0, 1)
              for name in PHOTOS]
    x = (torch.stack(images).float() / 255.0 - mean) / std
    return list(x.split(BATCH))


# ---------------------------------------------------------------------------------------------------------------
# the families: each builder returns (float model returning a tensor, image size, kind)


class HFOutput(nn.Module):
    """A Hugging Face model's tensor output ``field`` (its forward returns a ModelOutput); ``extra`` keyword
    arguments are passed on every call (ViT-MAE's fixed noise)."""

    def __init__(self, model: nn.Module, field: str, **extra):
        super().__init__()
        self.model, self.field = model, field
        for name, value in extra.items():
            self.register_buffer(name, value)
        self.extra = tuple(extra)

    def forward(self, pixel_values):
        kwargs = {name: getattr(self, name) for name in self.extra}
        return getattr(self.model(pixel_values=pixel_values, **kwargs), self.field)


def _randomise(model: nn.Module, suffixes: tuple[str, ...], std: float = 1.0) -> None:
    """Parameters initialised to zero (relative position bias tables) made random: a zero table masks nothing."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffixes):
                p.normal_(0.0, std)


def randomise_zero_embeddings(model: nn.Module, std: float = 0.02, seed: int = 0) -> list[str]:
    """Tokens and position embeddings that random initialisation leaves at zero (Hugging Face DeiT's cls and
    distillation tokens and position embeddings, register tokens, ...) drawn from N(0, std**2) instead, as a trained
    model holds them (0.02: Hugging Face's initializer_range). At zero, the cls token's residual values are only the
    attention's small outputs, far below the residual stream's per-tensor grid (set by the patch tokens): a random
    DeiT's logits then come out at cosine 0.99988 instead of 0.99994, one of the 8 photos' classes flipped (0.990
    instead of 0.999 when the ranges were the paper's EMA, which clipped). Returns the names drawn."""
    g = torch.Generator().manual_seed(seed)
    drawn = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ("token" in leaf or "position_embedding" in leaf or leaf in ("pos", "pos_embed", "cls")) \
                    and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
                drawn.append(name)
    return drawn


def deit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8, num_labels=10)
    return HFOutput(DeiTForImageClassificationWithTeacher(config), "logits"), 32, "classifier"


def _beit_config(attention, **extra):
    from transformers import BeitConfig

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    return BeitConfig(**{**sizes, **extra}, use_relative_position_bias=True, attn_implementation=attention)


def beit(attention):
    def build():
        from transformers import BeitModel

        model = BeitModel(_beit_config(attention), add_pooling_layer=False)
        _randomise(model, ("relative_position_bias_table",))
        return HFOutput(model, "last_hidden_state"), 32, "features"
    return build


def beit_segmentation():
    from transformers import BeitForSemanticSegmentation

    config = _beit_config("sdpa", image_size=64, num_hidden_layers=4, out_indices=[1, 2, 3, 4], pool_scales=[1, 2, 3, 6],
                          use_auxiliary_head=False, num_labels=5)
    model = BeitForSemanticSegmentation(config)
    _randomise(model, ("relative_position_bias_table",))
    return HFOutput(model, "logits"), 64, "segmenter"


def swin():
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4,
                        mlp_ratio=2.0)
    model = SwinModel(config, add_pooling_layer=True)
    _randomise(model, ("relative_position_bias_table",))
    return HFOutput(model, "pooler_output"), 32, "features"


def segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[16, 32, 48, 64],
                             patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], num_attention_heads=[1, 1, 2, 2],
                             mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=32, num_labels=5)
    return HFOutput(SegformerForSemanticSegmentation(config), "logits"), 64, "segmenter"


def clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)  # hidden_act: quick_gelu
    return HFOutput(CLIPVisionModel(config), "last_hidden_state"), 32, "features"


def siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)  # gelu_pytorch_tanh; attention-pooling head
    return HFOutput(SiglipVisionModel(config), "pooler_output"), 32, "features"


def vit_mae():
    from transformers import ViTMAEConfig, ViTMAEModel

    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8, mask_ratio=0.0)
    # fixed noise: the float model's token order is then the same on every call (the one it is compared with)
    noise = torch.rand(BATCH, 16, generator=torch.Generator().manual_seed(1))
    return HFOutput(ViTMAEModel(config), "last_hidden_state", noise=noise), 32, "features"


def dpt():
    from transformers import DPTConfig, DPTForSemanticSegmentation

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16, num_labels=5, use_auxiliary_head=False, readout_type="project")
    return HFOutput(DPTForSemanticSegmentation(config), "logits"), 32, "segmenter"


def dinov2_registers():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       image_size=32, patch_size=8, num_register_tokens=4, layerscale_value=0.5)
    return HFOutput(Dinov2WithRegistersModel(config), "last_hidden_state"), 32, "features"


class TorchEncoderViT(nn.Module):
    """A ViT from torch's own blocks: nn.TransformerEncoderLayer (nn.MultiheadAttention inside: its projections
    are made ``.contiguous()`` before a ``view``) in both norm orders; with ``encoder``, then an nn.TransformerEncoder
    (a GELU module, a final norm) in place of the last LayerNorm. (tests/test_pt2e.py and
    tests/test_normalize_attention.py build it too.)"""

    def __init__(self, dim=32, heads=2, classes=5, encoder=False):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first) for norm_first in (True, False))
        if encoder:
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation=nn.GELU(), batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        else:
            self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head((self.encoder(x) if hasattr(self, "encoder") else self.norm(x)).mean(1))


def torch_encoder():
    return TorchEncoderViT(classes=10), 32, "classifier"


class ControlViT(nn.Module):
    """The control: a timm-style ViT written with modules (one qkv Linear, ``q @ k.transpose * scale``,
    ``.softmax(-1)``, nn.GELU, cls token, mean-pooled head) that plain torch.fx traces, so that the FX and swap
    columns show those front ends working where tracing does."""

    def __init__(self, dim=32, heads=2, depth=2, classes=10):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim), norm2=nn.LayerNorm(dim),
            fc1=nn.Linear(dim, 2 * dim), act=nn.GELU(), fc2=nn.Linear(2 * dim, dim))) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        b, n, c = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
            x = x + blk["proj"]((attn @ v).transpose(1, 2).reshape(b, n, c))
            x = x + blk["fc2"](blk["act"](blk["fc1"](blk["norm2"](x))))
        return self.head(self.norm(x).mean(1))


def control_vit():
    return ControlViT(), 32, "classifier"


# probes: a family whose first blocker is rewritten as a float op the registry lowers, to show what else blocks it
# (same function unless the title says otherwise)


def probe_siglip_padding_0():
    model, size, kind = siglip()
    conv = model.model.embeddings.patch_embedding  # padding="valid" (aten.conv2d.padding) -> 0 (aten.conv2d)
    conv.padding, conv._reversed_padding_repeated_twice = (0, 0), [0, 0, 0, 0]
    return model, size, kind


class _MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(-1, keepdim=True)  # = AdaptiveAvgPool1d(1)


def probe_swin_mean_pooler():
    model, size, kind = swin()
    model.model.pooler = _MeanPool()
    return model, size, kind


def probe_torch_encoder_traceable():
    from iseg_plugin.lowering.normalize_attention import make_traceable

    model, size, kind = torch_encoder()
    return make_traceable(model), size, kind


def probe_clip_gelu():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, hidden_act="gelu")
    return HFOutput(CLIPVisionModel(config), "last_hidden_state"), 32, "features"


def probe_vit_mae_index():
    import types

    model, size, kind = vit_mae()

    def random_masking(self, sequence, noise=None):  # ViTMAE's, with advanced indexing in place of torch.gather
        b, n, _ = sequence.shape
        keep = int(n * (1 - self.config.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = sequence[torch.arange(b, device=sequence.device)[:, None], ids_shuffle[:, :keep]]
        mask = torch.ones([b, n], device=sequence.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    embeddings = model.model.embeddings
    embeddings.random_masking = types.MethodType(random_masking, embeddings)
    return model, size, kind


def _mmseg(backbone: dict, decode_head: dict, neck: dict | None = None):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = dict(type="EncoderDecoder", backbone=backbone, decode_head=decode_head)
    if neck is not None:
        cfg["neck"] = neck
    return fxp.traceable(MODELS.build(cfg).eval())


def mmseg_segformer():
    backbone = dict(type="MixVisionTransformer", in_channels=3, embed_dims=16, num_stages=4, num_layers=[1, 1, 1, 1],
                    num_heads=[1, 2, 4, 8], patch_sizes=[7, 3, 3, 3], sr_ratios=[8, 4, 2, 1], out_indices=(0, 1, 2, 3),
                    mlp_ratio=2, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    head = dict(type="SegformerHead", in_channels=[16, 32, 64, 128], in_index=[0, 1, 2, 3], channels=32, dropout_ratio=0.0,
                num_classes=5, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                loss_decode=dict(type="CrossEntropyLoss"))
    return _mmseg(backbone, head), 64, "segmenter"


def mmseg_upernet_vit():
    backbone = dict(type="VisionTransformer", img_size=(64, 64), patch_size=8, embed_dims=32, num_layers=4, num_heads=2,
                    mlp_ratio=2, out_indices=(0, 1, 2, 3), qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                    drop_path_rate=0.0, with_cls_token=True, norm_cfg=dict(type="LN", eps=1e-6), act_cfg=dict(type="GELU"),
                    norm_eval=False, interpolate_mode="bicubic")
    neck = dict(type="MultiLevelNeck", in_channels=[32, 32, 32, 32], out_channels=32, scales=[4, 2, 1, 0.5])
    head = dict(type="UPerHead", in_channels=[32, 32, 32, 32], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), channels=32,
                dropout_ratio=0.0, num_classes=5, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                loss_decode=dict(type="CrossEntropyLoss"))
    return _mmseg(backbone, head, neck), 64, "segmenter"


FAMILIES: dict[str, tuple[str, Callable]] = {
    "deit": ("HF DeiTForImageClassificationWithTeacher (logits)", deit),
    "beit-eager": ("HF BeitModel, relative position bias, eager attention", beit("eager")),
    "beit-sdpa": ("HF BeitModel, relative position bias, sdpa attention", beit("sdpa")),
    "beit-seg": ("HF BeitForSemanticSegmentation (sdpa; FPN + UperHead)", beit_segmentation),
    "swin": ("HF SwinModel with pooler (pooler_output)", swin),
    "segformer": ("HF SegformerForSemanticSegmentation", segformer),
    "clip": ("HF CLIPVisionModel (quick_gelu)", clip),
    "siglip": ("HF SiglipVisionModel (attention-pooling head, pooler_output)", siglip),
    "vit-mae": ("HF ViTMAEModel, mask_ratio 0 (fixed noise)", vit_mae),
    "dpt": ("HF DPTForSemanticSegmentation", dpt),
    "dinov2-reg": ("HF Dinov2WithRegistersModel (4 registers, LayerScale)", dinov2_registers),
    "torch-encoder": ("ViT of nn.TransformerEncoderLayer / nn.MultiheadAttention", torch_encoder),
    "mmseg-segformer": ("mmseg EncoderDecoder: MixVisionTransformer (MiT-B0-like) + SegformerHead", mmseg_segformer),
    "mmseg-upernet-vit": ("mmseg EncoderDecoder: VisionTransformer + MultiLevelNeck + UPerHead", mmseg_upernet_vit),
    "control-vit": ("control: a timm-style ViT of modules that plain torch.fx traces", control_vit),
    "probe-siglip-pad0": ("probe: siglip with its patch conv's padding='valid' written 0 (same function)",
                          probe_siglip_padding_0),
    "probe-swin-mean": ("probe: swin with its AdaptiveAvgPool1d(1) pooler written as a mean (same function)",
                        probe_swin_mean_pooler),
    "probe-vit-mae-index": ("probe: vit-mae with torch.gather of tokens written as indexing (same function)",
                            probe_vit_mae_index),
    "probe-torch-encoder-traceable": ("probe: torch-encoder after lowering.normalize_attention.make_traceable "
                                      "(same function, traceable by torch.fx)", probe_torch_encoder_traceable),
    "probe-clip-gelu": ("probe: clip with erf GELU in place of quick-GELU (another function: what else blocks)",
                        probe_clip_gelu),
}


# ---------------------------------------------------------------------------------------------------------------
# measurements


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("time limit reached")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def _where(err: BaseException) -> str:
    """The innermost frame of the plugin (or, failing that, the last frame) the exception passed through."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if str(REPO) in f.filename and "benchmarks/families.py" not in f.filename]
    f = (ours or frames or [None])[-1]
    return "" if f is None else f"{Path(f.filename).relative_to(REPO) if str(REPO) in f.filename else f.filename}:{f.lineno}"


def _is_trace_failure(err: BaseException) -> bool:
    if isinstance(err, fxp.FxTraceError):
        return True
    if isinstance(err, LoweringError) and "cannot trace module" in str(err):
        return True
    files = [f.filename for f in traceback.extract_tb(err.__traceback__)]
    return any("torch/fx/_symbolic_trace.py" in f or "torch/fx/proxy.py" in f for f in files)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


def at_limits(out: torch.Tensor, bits: int | None = None) -> float:
    """Share of integers at the limits of their integer type (or of a ``bits``-wide signed integer)."""
    if bits is None:
        info = torch.iinfo(out.dtype)
        lo, hi = info.min, info.max
    else:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out = out.long()
    return float(((out >= hi) | (out <= max(lo, -hi))).double().mean())


def _target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    t = node.target
    return t if isinstance(t, str) else str(t) if "aten" in str(t) else getattr(t, "__name__", str(t))


def blockers(gm: fx.GraphModule) -> dict[str, int]:
    """Every op of a prepared graph the lowering cannot take: no registry entry, or a resize the entry refuses by its
    arguments. Counted by op."""
    static = static_nodes(gm.graph)
    found: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node in static:
            continue
        if node.op == "call_module" and ("activation_post_process" in str(node.target)
                                         or str(node.target) == "_guards_fn"):
            continue
        if node.op == "call_function" and ("quantize_per_tensor" in str(node.target) or "_assert" in str(node.target)):
            continue  # (observers' quantize ops; torch.export's assertions, which the lowering drops)
        resize = _resize_refusal(node, gm)
        if resize is not None:
            found[resize] += 1
            continue
        if REGISTRY.entry_for(node, gm) is None:
            found[_target_name(node, gm)] += 1
    return dict(found)


def _resize_refusal(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """An interpolation the registry's entry refuses by its arguments (it lowers nearest, and bilinear with
    align_corners=False): bilinear with align_corners=True (DPT), other modes."""
    aten = torch.ops.aten
    if node.op == "call_function" and node.target == aten.upsample_bilinear2d.vec:
        align = node.args[2] if len(node.args) > 2 else node.kwargs.get("align_corners", False)
        return "interpolate bilinear align_corners=True" if align else None
    if node.op == "call_function" and node.target is F.interpolate:
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        align = node.kwargs.get("align_corners", node.args[4] if len(node.args) > 4 else None)
        if mode == "bilinear" and align:
            return "interpolate bilinear align_corners=True"
        return None if mode in ("nearest", "bilinear") else f"interpolate {mode}"
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Upsample):
        m = gm.get_submodule(node.target)
        if m.mode == "bilinear" and m.align_corners:
            return "interpolate bilinear align_corners=True"
        return None if m.mode in ("nearest", "bilinear") else f"interpolate {m.mode}"
    return None


def graph_notes(gm: fx.GraphModule | None) -> list[str]:
    """What a prepared graph does that the table does not show: GELU's tanh approximation (lowered as erf GELU)."""
    if gm is None:
        return []
    notes = []
    tanh = [n.name for n in gm.graph.nodes if n.op == "call_function" and "gelu" in str(n.target)
            and (n.kwargs.get("approximate") == "tanh" or "tanh" in [a for a in n.args[1:] if isinstance(a, str)])]
    if tanh:
        notes.append(f"{len(tanh)} GELU(approximate='tanh') node(s) ({tanh[0]}, ...): the registry lowers them as erf "
                     "GELU (Poly-GELU fits erf GELU; tanh GELU differs from it by at most 4.7e-4)")
    return notes


def _refusal(err: LoweringError) -> tuple[str, str]:
    text = str(err)
    node = re.search(r"node '([^']+)' \(([^)]*)\)", text)
    return (f"{node.group(1)} ({node.group(2)})" if node else ""), text.strip()


def _measure(int_model, float_model, batches, kind) -> dict:
    """Run the integer model on every batch under OpAudit; compare with the float model."""
    outs, refs, float_ops, records = [], [], Counter(), 0
    for x in batches:
        inputs = fxp.quantize_inputs(int_model, x)
        with torch.no_grad(), OpAudit() as audit:
            out = int_model(*inputs)
        records += len(audit.records)
        float_ops.update(r.op for r in audit.float_ops())
        out = out[0] if isinstance(out, tuple) else out
        outs.append(out)
        with torch.no_grad():
            ref = float_model(x)
        refs.append(ref[0] if isinstance(ref, tuple) else ref)
    out, ref = torch.cat(outs), torch.cat(refs)
    deq = out.double() * int_model.output_scales[0]
    row = dict(float_ops=sum(float_ops.values()), float_op_names=dict(float_ops), ops=records,
               cosine=cosine(deq, ref), saturation=at_limits(out), output_dtype=str(out.dtype).replace("torch.", ""))
    if kind == "segmenter" and ref.dim() == 4:
        row["agreement"] = float((deq.argmax(1) == ref.argmax(1)).double().mean())
    elif kind == "classifier":
        row["agreement"] = float((deq.argmax(-1) == ref.argmax(-1)).double().mean())
    row["outcome"] = "integer-only" if not float_ops and not out.dtype.is_floating_point else "float ops"
    return row


def run_pt2e(model, batches, kind) -> dict:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    stage = "export"
    prepared = None
    try:
        exported = torch.export.export(model, (batches[0],)).module()
        stage = "prepare_pt2e"
        prepared = prepare_pt2e(exported, fxp.ISegQuantizer())
        stage = "calibrate"
        with torch.no_grad():
            for x in batches:
                prepared(x)
        stage = "convert"
        int_model = fxp.convert(prepared, (batches[0],))
        stage = "run"
        return dict(_measure(int_model, model, batches, kind), notes=graph_notes(prepared))
    except LoweringError as err:
        node, text = _refusal(err)
        return dict(outcome="refused", stage=stage, node=node, reason=text,
                    blockers=blockers(prepared) if prepared is not None else {}, notes=graph_notes(prepared))
    except Timeout:
        raise
    except Exception as err:
        if stage == "export":
            return dict(outcome="not exportable", stage=stage, reason=_first_line(err), where=_where(err))
        return dict(outcome="crash", stage=stage, reason=_first_line(err), where=_where(err),
                    blockers=blockers(prepared) if prepared is not None else {})


def run_fx(model, batches, kind, state: dict) -> dict:
    stage = "prepare_fx"
    prepared = None
    try:
        prepared = fxp.prepare(copy.deepcopy(model), (batches[0],))
        stage = "calibrate"
        with torch.no_grad():
            for x in batches:
                prepared(x)
        state["fx_traced"] = True
        stage = "convert"
        int_model = fxp.convert(prepared, (batches[0],))
        stage = "run"
        return _measure(int_model, model, batches, kind)
    except LoweringError as err:
        node, text = _refusal(err)
        return dict(outcome="refused", stage=stage, node=node, reason=text,
                    blockers=blockers(prepared) if prepared is not None else {})
    except Timeout:
        raise
    except Exception as err:
        if stage == "prepare_fx" and _is_trace_failure(err):
            return dict(outcome="not traceable", stage=stage, reason=f"not traceable by FX: {_first_line(err)}",
                        where=_where(err))
        return dict(outcome="crash", stage=stage, reason=_first_line(err), where=_where(err),
                    blockers=blockers(prepared) if prepared is not None else {})


def run_swap(model, batches, kind, state: dict) -> dict:
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.quant_tensor import QuantTensor

    from iseg_plugin.nn import quantize

    stage = "swap"
    model64 = copy.deepcopy(model).double().eval()
    batches64 = [x.double() for x in batches]
    try:
        swapped = quantize(copy.deepcopy(model64))
        stage = "calibrate"
        with torch.no_grad(), calibration_mode(swapped):
            for x in batches64:
                swapped(x)
        swapped.eval()
        stage = "run"
        outs, ints, refs = [], [], []
        with torch.no_grad():
            for x in batches64:
                out = swapped(x)
                if not isinstance(out, QuantTensor):
                    raise TypeError(f"the swapped model returned {type(out).__name__}, not a QuantTensor")
                outs.append(out.value)
                ints.append(out.int().long())
                refs.append(model64(x))
        value, ref, ints = torch.cat(outs), torch.cat(refs), torch.cat(ints)
        row = dict(outcome="swapped", float_ops=None, cosine=cosine(value, ref), saturation=at_limits(ints, int(out.bit_width)),
                   output_dtype=f"int{int(out.bit_width)} (Brevitas, float64)")
        if kind == "segmenter" and ref.dim() == 4:
            row["agreement"] = float((value.argmax(1) == ref.argmax(1)).double().mean())
        elif kind == "classifier":
            row["agreement"] = float((value.argmax(-1) == ref.argmax(-1)).double().mean())
        if state.get("fx_traced"):
            stage = "compare with FX"
            row["same_integers_as_fx"] = _same_integers(model64, batches64, swapped, ints)
        return row
    except LoweringError as err:
        if _is_trace_failure(err):
            return dict(outcome="not traceable", stage=stage, reason=f"not traceable by FX: {str(err).splitlines()[0]}")
        node, text = _refusal(err)
        try:  # every op of the swap's graph without a lowering (it traces with plain torch.fx)
            found = blockers(fx.symbolic_trace(copy.deepcopy(model64)))
        except Exception:
            found = {}
        return dict(outcome="refused", stage=stage, node=node, reason=text, blockers=found)
    except Timeout:
        raise
    except Exception as err:
        if stage == "swap" and _is_trace_failure(err):
            return dict(outcome="not traceable", stage=stage, reason=f"not traceable by FX: {_first_line(err)}",
                        where=_where(err))
        return dict(outcome="crash", stage=stage, reason=_first_line(err), where=_where(err))


def _same_integers(model64, batches64, swapped, swap_ints) -> bool | str:
    """The FX lowering of the same float64 model (GELU on the swap's symmetric grid), calibrated on the same batches,
    run on the integers the swapped model's input quantizer makes: the same output integers?"""
    try:
        prepared = fxp.prepare(copy.deepcopy(model64), (batches64[0],), gelu_grid="symmetric")
        with torch.no_grad():
            for x in batches64:
                prepared(x)
        int_model = fxp.convert(prepared, (batches64[0],))
        placeholder = next(n for n in swapped.graph.nodes if n.op == "placeholder")
        quant = swapped.get_submodule(f"{placeholder.name}_quant")
        lo, hi = int_model.input_formats[0][1]
        outs = []
        with torch.no_grad():
            for x in batches64:
                xi = quant(x).int()
                outs.append(int_model(xi.to(torch.int8 if hi <= 127 else torch.int16)).long())
        return bool(torch.equal(torch.cat(outs), swap_ints))
    except Exception as err:  # the FX lowering refused: nothing to compare with
        return f"not compared ({_first_line(err)})"


def run_family(name: str, timeout: int, front_ends=FRONT_ENDS) -> list[dict]:
    title, build = FAMILIES[name]
    rows = []
    torch.manual_seed(0)
    try:
        model, size, kind = build()
        model = model.eval()
        drawn = randomise_zero_embeddings(model)
        batches = photos(size)
    except Exception as err:
        reason = _first_line(err)
        print(f"  {name}: model not built: {reason}", flush=True)
        return [dict(family=name, title=title, front_end=fe, outcome="skipped", reason=f"model not built: {reason}")
                for fe in front_ends]
    params = sum(p.numel() for p in model.parameters())
    state: dict = {}
    for front_end in front_ends:
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
        try:
            if front_end == "pt2e":
                row = run_pt2e(model, batches, kind)
            elif front_end == "fx":
                row = run_fx(model, batches, kind, state)
            else:
                row = run_swap(model, batches, kind, state)
        except Timeout:
            row = dict(outcome="timeout", reason=f"more than {timeout} s")
        except Exception as err:  # (the runners catch their own: this is the harness)
            row = dict(outcome="crash", reason=_first_line(err), where=_where(err))
        finally:
            signal.alarm(0)
        row = dict(family=name, title=title, front_end=front_end, kind=kind, image=size, params=params,
                   zero_embeddings_drawn=drawn, time_s=round(time.perf_counter() - start, 2), **row)
        for key in ("reason", "where"):
            if isinstance(row.get(key), str):
                row[key] = _clean(row[key])
        rows.append(row)
        print(f"  {name:18s} {front_end:5s} {_summary(row)}", flush=True)
    return rows


def _clean(text: str) -> str:
    """Paths in messages made machine-independent: site-packages' and the repository's prefixes dropped."""
    return re.sub(r"/\S*?/site-packages/", "", text).replace(str(REPO) + "/", "")


def _summary(row: dict) -> str:
    parts = [row["outcome"]]
    if row.get("cosine") is not None:
        parts.append(f"cos {row['cosine']:.4f}")
    if row.get("agreement") is not None:
        parts.append(f"agree {100 * row['agreement']:.1f}%")
    if row.get("saturation") is not None:
        parts.append(f"sat {100 * row['saturation']:.2f}%")
    if row.get("float_ops"):
        parts.append(f"{row['float_ops']} float ops")
    if row.get("same_integers_as_fx") is not None:
        parts.append(f"same integers as FX: {row['same_integers_as_fx']}")
    if row.get("node"):
        parts.append(f"node {row['node']}")
    if row.get("reason") and row["outcome"] not in ("refused",):
        parts.append(row["reason"][:160])
    elif row.get("reason"):
        parts.append(_refusal_why(row["reason"])[:160])
    parts.append(f"{row.get('time_s', 0):.1f} s")
    return " | ".join(parts)


def _refusal_why(text: str) -> str:
    """A lowering refusal's first line with its source file shortened to ``file.py:line`` and the advice cut."""
    first = text.splitlines()[0]
    first = re.sub(r'at File "([^"]*)", line (\d+), in [^:]*: ', lambda m: f"at {Path(m.group(1)).name}:{m.group(2)}: ", first)
    return first.split(": add a registry entry")[0]


# ---------------------------------------------------------------------------------------------------------------
# report


def _cell(value, fmt):
    return "-" if value is None else fmt(value)


def write_report(rows: list[dict], out_dir: Path, elapsed: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, transformers=_version("transformers"), mmseg=_version("mmseg"),
                brevitas=_version("brevitas"), torchao=_version("torchao"), photos=list(PHOTOS), batch=BATCH,
                elapsed_s=round(elapsed, 1), generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    (out_dir / "families.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str) + "\n")
    lines = [
        "# ViT families through the three front ends (issue 39)",
        "",
        f"`benchmarks/families.py` ({meta['generated']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"mmseg {meta['mmseg']}, brevitas {meta['brevitas']}, torchao {meta['torchao']}). Random-weight tiny models "
        f"(seed 0; tokens and position embeddings that initialisation leaves at zero drawn from N(0, 0.02^2), as a "
        f"trained model holds them: see `randomise_zero_embeddings`), calibrated on {len(PHOTOS)} photos of scikit-image's wheel in batches of {BATCH} and measured on "
        "the same photos. Front ends: **pt2e** = `torch.export` -> torchao `prepare_pt2e(ISegQuantizer())` -> "
        "`fxp.convert`; **fx** = stock `prepare_fx` with the plugin's qconfig mapping and backend config -> `fxp.convert`; "
        "**swap** = `iseg_plugin.nn.quantize` (Brevitas layers, float64, integers emulated in float: no OpAudit; "
        "\"same ints\" compares its output integers with the FX lowering's on the same input integers).",
        "",
        "Columns: float ops = float ATen ops the OpAudit saw while the converted model ran the photos (0 = integer-only); "
        "cosine = of the dequantized output to the float model's; agreement = argmax agreement (per pixel for "
        "segmenters, per image for classifiers); saturation = share of output integers at the limits of their "
        "integer type; time = prepare + calibrate + convert + run, seconds on a shared 2-core CPU.",
        "",
        "| family | front end | outcome | float ops | cosine | agreement | saturation | time s | blocking node / reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        why = ""
        if r["outcome"] == "refused":
            why = f"`{r.get('node', '')}`: {_refusal_why(r.get('reason', ''))}"
        elif r["outcome"] not in ("integer-only", "swapped"):
            why = r.get("reason", "") + (f" ({r['where']})" if r.get("where") else "")
        elif r.get("same_integers_as_fx") is not None:
            why = f"same ints as FX: {r['same_integers_as_fx']}"
        why = why.replace("|", "\\|").replace("\n", " ")
        if len(why) > 220:
            why = why[:217] + "..."
        lines.append(f"| {r['family']} | {r['front_end']} | {r['outcome']} | {_cell(r.get('float_ops'), str)} | "
                     f"{_cell(r.get('cosine'), lambda v: f'{v:.4f}')} | {_cell(r.get('agreement'), lambda v: f'{100 * v:.1f} %')} | "
                     f"{_cell(r.get('saturation'), lambda v: f'{100 * v:.2f} %')} | {_cell(r.get('time_s'), lambda v: f'{v:.1f}')} | {why} |")
    lines += [
        "",
        "Reading the FX and swap columns: transformers 5 dropped its torch.fx tracer (`transformers.utils.fx`, "
        "HFTracer), and its vision models check shapes and dtypes in Python (`if num_channels != ...`, "
        "`if pixel_values.dtype != ...`, `(*input_shape, -1, head_dim)`), so plain torch.fx (what `prepare_fx` and the "
        "Brevitas swap trace with) cannot trace any of them; mmseg's stock backbones branch on the input size "
        "(`AdaptivePadding`) or call `len()` on shapes. torch.export traces all of them: PT2E is their route. Where FX "
        "does trace (torch's `TransformerEncoderLayer`, the control), the swap is measured and compared with the FX "
        "lowering's integers.",
        "",
        "The `probe-*` rows rewrite a family's first blocker as a float op the registry already lowers (the same "
        "function unless the title says otherwise) to show what else blocks it: where a probe is integer-only, that "
        "one op is all the family lacks.",
    ]
    lines += _blocker_sections(rows)
    lines += ["", "## Refusals, not-traceable models and crashes, family by family", ""]
    by_family: dict[str, list[dict]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    for family, frows in by_family.items():
        bad = [r for r in frows if r["outcome"] not in ("integer-only", "swapped")]
        if not bad:
            continue
        lines.append(f"**{family}** ({frows[0]['title']}).")
        for r in bad:
            if r["outcome"] == "refused":
                text = f"{r['front_end']}: refused at `{r.get('node', '')}`: {_refusal_why(r.get('reason', ''))}."
            else:
                text = f"{r['front_end']}: {r['outcome']}: {r.get('reason', '')}" + (f" (at {r['where']})" if r.get("where") else "") + "."
            if r.get("blockers"):
                listed = "; ".join(f"{op} x{n}" for op, n in sorted(r["blockers"].items(), key=lambda kv: -kv[1]))
                text += f" Every op of its prepared graph without a lowering: {listed}."
            lines.append(f"- {text}")
        lines.append("")
    (out_dir / "families.md").write_text("\n".join(lines) + "\n")


# op category -> where its integer arithmetic is today (iseg_plugin.intops) or what removes it
REMEDY = {
    "general conv2d (padding, stride != kernel)": "the `conv2d` entry (any geometry)",
    "depthwise conv2d": "the `conv2d` entry (groups)",
    "conv2d.padding overload ('valid' / 'same')": "the `conv2d` entry (`aten.conv2d.padding`)",
    "ConvTranspose2d": "the `conv_transpose2d` entry",
    "ReLU / clamp": "`intops.relu` / `relu6` / `int_clamp` (exact)",
    "adaptive avg pool": "`intops.avg_pool` + `adaptive_avg_pool_params`",
    "avg pool": "`intops.avg_pool` + `avg_pool_params`",
    "max pool": "`intops.max_pool` (exact)",
    "sigmoid (quick-GELU x*sigmoid(1.702x), SiLU)": "`intops.sigmoid` / `x_sigmoid` / `quick_gelu` / `silu`",
    "gather / index_select / indexing by tensors (static indices)": "value-preserving: a shape op on the integers (no arithmetic)",
    "nn.MultiheadAttention / TransformerEncoderLayer (an FX leaf module)": "`lowering.normalize_attention.make_traceable` (FX, swap); PT2E traces into it",
    "BatchNorm": "`lowering.normalize_conv.fold_batch_norm` (FX); torchao folds it in PT2E",
    "interpolate bilinear align_corners=True": "`intops.upsample_bilinear(..., align_corners=True)` (exact weights)",
    "not traceable by torch.fx": "PT2E (torch.export traces it)",
}


def _category(op: str) -> str:
    low = op.lower()
    if low.startswith("depthwise conv2d"):
        return "depthwise conv2d"
    if low.startswith("conv2d.padding"):
        return "conv2d.padding overload ('valid' / 'same')"
    if low.startswith("conv2d "):
        return "general conv2d (padding, stride != kernel)"
    if "convtranspose" in low or "conv_transpose" in low:
        return "ConvTranspose2d"
    if any(k in low for k in ("relu", "clamp", "hardtanh")):
        return "ReLU / clamp"
    if "adaptive_avg_pool" in low or "adaptiveavgpool" in low:
        return "adaptive avg pool"
    if "avg_pool" in low or "avgpool" in low:
        return "avg pool"
    if "max_pool" in low or "maxpool" in low:
        return "max pool"
    if "sigmoid" in low or "silu" in low:
        return "sigmoid (quick-GELU x*sigmoid(1.702x), SiLU)"
    if "gather" in low or "index_select" in low or low.startswith("aten.index.tensor"):
        return "gather / index_select / indexing by tensors (static indices)"
    if "multiheadattention" in low or "transformerencoderlayer" in low:
        return "nn.MultiheadAttention / TransformerEncoderLayer (an FX leaf module)"
    if "batch_norm" in low or "batchnorm" in low:
        return "BatchNorm"
    if "align_corners=true" in low:
        return "interpolate bilinear align_corners=True"
    return op


def family_blockers(rows: list[dict]) -> dict[str, dict[str, set[str]]]:
    """family -> op category -> the front ends whose graphs hold it (refused / crashed rows' scans, the refused node,
    and torch.fx tracing failures)."""
    found: dict[str, dict[str, set[str]]] = {}
    for r in rows:
        cats = found.setdefault(r["family"], {})
        ops = list(r.get("blockers") or {})
        if r["outcome"] == "refused" and r.get("node"):
            m = re.search(r"\(call_\w+ ([^)]*)\)", r["node"])
            if m and not ops:
                ops.append(m.group(1))
            if "conv2d.padding" in r["node"]:
                ops.append("conv2d.padding")
        if r["outcome"] == "not traceable":
            ops.append("not traceable by torch.fx")
        for op in ops:
            cats.setdefault(_category(op), set()).add(r["front_end"])
    return found


def _blocker_sections(rows: list[dict]) -> list[str]:
    found = family_blockers(rows)
    lines = ["", "## What blocks each family", "",
             "Every op of a refused graph with no registry entry, and every resize the entry refuses by "
             "its arguments (not only the first op the lowering stops at), by category, with the front ends whose "
             "graphs hold it; \"-\": nothing blocks (integer-only). Other refusals by argument show up one at a time, "
             "in the outcome column.", "",
             "| family | PT2E | FX / swap |", "|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        cats = found.get(family, {})
        pt2e = sorted(c for c, fes in cats.items() if "pt2e" in fes)
        other = sorted(c for c, fes in cats.items() if fes & {"fx", "swap"})
        lines.append(f"| {family} | {'; '.join(pt2e) or '-'} | {'; '.join(other) or '-'} |")
    counts: Counter = Counter()
    real = {f: cats for f, cats in found.items() if not f.startswith(("probe-", "control-"))}
    for cats in real.values():
        for c, fes in cats.items():
            if "pt2e" in fes:
                counts[c] += 1
    lines += ["", "Ops by the number of families (probes and the control left out) whose PT2E graph they block, and where "
              "their integer arithmetic is:", "",
              "| op | families (PT2E) | integer arithmetic |", "|---|---|---|"]
    for c, n in counts.most_common():
        lines.append(f"| {c} | {n} | {REMEDY.get(c, '-')} |")
    fx_only = Counter(c for cats in real.values() for c, fes in cats.items() if fes & {"fx", "swap"} and "pt2e" not in fes)
    for c, n in fx_only.most_common():
        lines.append(f"| {c} (FX / swap only) | 0 (FX: {n}) | {REMEDY.get(c, '-')} |")
    notes = [(r["family"], note) for r in rows for note in r.get("notes") or []]
    if notes:
        lines += ["", "Notes: " + "; ".join(f"{family}: {note}" for family, note in notes) + "."]
    return lines


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of: {', '.join(FAMILIES)}")
    parser.add_argument("--front-ends", default=",".join(FRONT_ENDS))
    parser.add_argument("--out-dir", default=str(REPO / "docs"))
    parser.add_argument("--timeout", type=int, default=600, help="seconds per (family, front end)")
    args = parser.parse_args()
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    front_ends = tuple(f.strip() for f in args.front_ends.split(",") if f.strip())
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows: list[dict] = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: {FAMILIES[name][0]}", flush=True)
        rows += run_family(name, args.timeout, front_ends)
    elapsed = time.perf_counter() - start
    write_report(rows, Path(args.out_dir), elapsed)
    print(f"written {args.out_dir}/families.md and families.json in {elapsed:.0f} s", flush=True)


if __name__ == "__main__":
    main()
