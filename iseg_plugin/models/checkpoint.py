"""Loading stock mmseg Segmenter checkpoints into the plugin's modules.

A ``load_state_dict`` pre-hook on the encoder and on the decode head renames mmseg's keys
(mmcv ``MultiheadAttention`` / ``FFN`` / ``ln1``) to the plugin's explicit modules, resizes the
position embedding to the model's grid (bicubic, as mmseg does for pretrained weights), and
refuses a checkpoint that belongs to another architecture with an error that says what differs.
Keys the checkpoint may lack, such as quantization ranges, are left to the caller.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

_BLOCK_RENAMES = [
    (re.compile(r"^layers\.(\d+)\.ln([12])\."), r"layers.\1.norm\2."),
    (re.compile(r"^layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$"), r"layers.\1.attn.qkv.\2"),
    (re.compile(r"^layers\.(\d+)\.attn\.attn\.out_proj\."), r"layers.\1.attn.proj."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.0\.0\."), r"layers.\1.mlp.fc1."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.1\."), r"layers.\1.mlp.fc2."),
]
_VIT_RENAMES = _BLOCK_RENAMES + [(re.compile(r"^ln1\."), "norm.")]


# buffers of the quantized model's range observers: a quantized checkpoint loads into the float
# model by leaving them out
_QUANT_STATE = {"min_val", "max_val", "calibrated", "observing", "poly_ab", "mean", "std"}


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model (another architecture or size)."""


def _rename(state_dict: dict, prefix: str, renames) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        for pattern, repl in renames:
            new = pattern.sub(repl, local)
            if new != local:
                state_dict[prefix + new] = state_dict.pop(key)
                break


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a (1, 1 + g*g, C) position embedding (cls first, square grid) to ``grid``."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointMismatchError(f"pos_embed with {n} patch positions is not a square grid")
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode=mode, align_corners=False).to(pos_embed.dtype)
    return torch.cat((cls_pos, patch_pos.flatten(2).transpose(1, 2)), dim=1)


def _check_and_fit(module: nn.Module, state_dict: dict, prefix: str) -> None:
    own = module.state_dict()
    params = {name for name, _ in module.named_parameters()}
    found = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
    if not found:
        return  # nothing for this module in the checkpoint (e.g. a backbone-only file)
    problems = []
    grid = getattr(module, "grid", None)
    for local, key in found.items():
        if local not in own and local.rsplit(".", 1)[-1] in _QUANT_STATE:
            del state_dict[key]
        elif local not in own:
            problems.append(f"unexpected key '{key}'")
        elif state_dict[key].shape != own[local].shape:
            if local == "pos_embed" and grid is not None:
                state_dict[key] = resize_pos_embed(state_dict[key], grid, getattr(module, "interpolate_mode", "bicubic"))
            else:
                problems.append(f"'{key}' has shape {tuple(state_dict[key].shape)}, the model expects "
                                f"{tuple(own[local].shape)}")
    missing = sorted(params - set(found))
    if missing:
        problems.append(f"missing {len(missing)} parameters, e.g. '{prefix}{missing[0]}'")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise CheckpointMismatchError(
            f"checkpoint does not match {type(module).__name__} at '{prefix or '<root>'}': {shown}. "
            "It was probably saved from another architecture (embed_dims, num_layers, num_heads, "
            "num_classes or patch_size differ): use the checkpoint that goes with this config."
        )


def _register(module: nn.Module, renames) -> None:
    def hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        _rename(state_dict, prefix, renames)
        _check_and_fit(module, state_dict, prefix)

    module._register_load_state_dict_pre_hook(hook)


def register_vit_checkpoint_hook(module: nn.Module) -> None:
    """Make ``module`` (an encoder) accept mmseg ``VisionTransformer`` keys."""
    _register(module, _VIT_RENAMES)


def register_head_checkpoint_hook(module: nn.Module) -> None:
    """Make ``module`` (a Mask Transformer head) accept mmseg ``SegmenterMaskTransformerHead`` keys."""
    _register(module, _BLOCK_RENAMES)
