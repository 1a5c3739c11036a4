"""torch's own attention blocks rewritten as modules torch.fx traces into: ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` -> the same arithmetic with ``nn.Linear``, ``@``,
``softmax`` and ``nn.LayerNorm``, sharing the original parameters.

torch.ao's FX tracer (``prepare_fx``) and the Brevitas swap's ``fx.symbolic_trace`` treat every ``torch.nn`` module
as a leaf, so a ViT built from ``nn.TransformerEncoderLayer`` reaches the lowering as one opaque call and is refused
by node. torch.export (PT2E) traces through them. :func:`make_traceable` is the FX-side equivalent, which
``fxp.prepare`` and the Brevitas swap (``iseg_plugin.nn.quantize``) apply to a copy of a model that holds such
blocks (stock ``prepare_fx`` users call it themselves)::

    model = make_traceable(model)          # a copy; the float function is the same (up to float rounding)

What is rewritten: self- and cross-attention with or without ``batch_first``, with separate or packed
projections and biases; encoder layers in both norm orders with any activation (a function or a module), and the
encoder container (its optional final norm). What is not: attention masks, key padding masks and ``is_causal``
(the rewritten modules raise, naming the argument: the registry has no lowering for a masking attention),
``add_bias_kv`` / ``add_zero_attn`` (refused at rewrite time), decoder layers (left as they are: the lowering
refuses them by node). In training mode the dropouts stay (``nn.Dropout`` modules, identity in eval); attention
dropout is applied to the probabilities as in torch.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class TraceableMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (no masks) as Linear projections, ``q @ k^T * d**-0.5``, softmax, ``@ v``, Linear."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no traceable rewrite")
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.batch_first = h, e // h, mha.batch_first
        self.scale = float(self.head_dim) ** -0.5
        bias = mha.in_proj_bias
        self.q_proj = nn.Linear(e, e, bias=bias is not None)
        self.k_proj = nn.Linear(mha.kdim, e, bias=bias is not None)
        self.v_proj = nn.Linear(mha.vdim, e, bias=bias is not None)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w, i in ((self.q_proj, wq, 0), (self.k_proj, wk, 1), (self.v_proj, wv, 2)):
                proj.weight.copy_(w)
                if bias is not None:
                    proj.bias.copy_(bias[i * e:(i + 1) * e])
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.dropout = nn.Dropout(mha.dropout)
        self.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        for name, given in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if given is not None:
                raise NotImplementedError(f"TraceableMultiheadAttention takes no {name}: the integer lowering has no "
                                          "masking attention")
        if is_causal:
            raise NotImplementedError("TraceableMultiheadAttention is not causal: the integer lowering has no masking "
                                      "attention")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n, e = query.shape
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        context = (self.dropout(attn) @ v).transpose(1, 2).reshape(b, n, e)
        out = self.out_proj(context)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None  # (attention weights are not returned: need_weights is ignored)


class TraceableEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (no masks) with its modules, and its attention made traceable."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = TraceableMultiheadAttention(layer.self_attn)
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm1, self.norm2, self.dropout1, self.dropout2 = layer.norm1, layer.norm2, layer.dropout1, layer.dropout2
        self.norm_first, self.activation = layer.norm_first, layer.activation

    def _sa_block(self, x: Tensor) -> Tensor:
        return self.dropout1(self.self_attn(x, x, x)[0])

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False) -> Tensor:
        if src_mask is not None or src_key_padding_mask is not None or is_causal:
            raise NotImplementedError("TraceableEncoderLayer takes no mask: the integer lowering has no masking attention")
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x))
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x))
        return self.norm2(x + self._ff_block(x))


class TraceableEncoder(nn.Module):
    """``nn.TransformerEncoder`` (no masks): its layers one after the other, then its optional norm."""

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(_rewrite(layer) for layer in encoder.layers)
        self.norm = encoder.norm

    def forward(self, src: Tensor, mask=None, src_key_padding_mask=None, is_causal=None) -> Tensor:
        if mask is not None or src_key_padding_mask is not None or is_causal:
            raise NotImplementedError("TraceableEncoder takes no mask: the integer lowering has no masking attention")
        for layer in self.layers:
            src = layer(src)
        return src if self.norm is None else self.norm(src)


def _rewrite(module: nn.Module) -> nn.Module:
    """The rewrite of one of torch's blocks (exact classes only: a subclass may have a forward of its own)."""
    kind = type(module)
    if kind is nn.TransformerEncoder:
        return TraceableEncoder(module)
    if kind is nn.TransformerEncoderLayer:
        return TraceableEncoderLayer(module)
    if kind is nn.MultiheadAttention:
        return TraceableMultiheadAttention(module)
    return module


def needs_rewrite(model: nn.Module) -> bool:
    """Whether ``model`` holds one of torch's blocks that :func:`make_traceable` rewrites."""
    return any(_rewrite(m) is not m for m in model.modules())


def make_traceable(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every ``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` replaced by its traceable rewrite (module docstring), in the same training mode."""
    if not inplace:
        model = copy.deepcopy(model)
    if _rewrite(model) is not model:  # (rewriting the model itself builds a new module: the copy above is unused)
        return _rewrite(model).train(model.training)
    for name, child in list(model.named_children()):
        new = _rewrite(child)
        if new is not child:
            setattr(model, name, new.train(child.training))
        else:
            make_traceable(child, inplace=True)
    return model


__all__ = ["make_traceable", "needs_rewrite", "TraceableMultiheadAttention", "TraceableEncoderLayer", "TraceableEncoder"]
