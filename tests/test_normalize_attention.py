"""torch's attention blocks rewritten as traceable modules (iseg_plugin.lowering.normalize_attention): the same float
function, and the FX front end and the Brevitas swap then lower a ViT of nn.TransformerEncoderLayer."""
import copy

import pytest
import torch
from torch.ao.quantization.quantize_fx import prepare_fx
import torch.nn.functional as F
from torch import nn

import fx_patterns as fxp
from iseg_plugin.deploy import OpAudit
from iseg_plugin.lowering.normalize_attention import TraceableEncoderLayer, make_traceable

from test_brevitas_swap import batches_of, both_paths
from test_pt2e import TorchEncoderViT


def test_the_rewrite_computes_the_same_function():
    torch.manual_seed(0)
    model = TorchEncoderViT(encoder=True).eval()
    traceable = make_traceable(model)
    assert not any(isinstance(m, (nn.TransformerEncoderLayer, nn.MultiheadAttention, nn.TransformerEncoder))
                   for m in traceable.modules())
    assert any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules())  # the input model is untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traceable(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_with_other_key_and_value_widths(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=8, batch_first=batch_first).eval()
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 8)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    rewritten = make_traceable(mha)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(q, k, v)[0], mha(q, k, v)[0], rtol=1e-5, atol=1e-6)


def test_masks_and_bias_kv_are_refused_by_name():
    layer = TraceableEncoderLayer(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval())
    with pytest.raises(NotImplementedError, match="no mask"):
        layer(torch.randn(1, 3, 16), src_mask=torch.zeros(3, 3))
    mha = make_traceable(nn.MultiheadAttention(16, 2))
    with pytest.raises(NotImplementedError, match="no attn_mask"):
        mha(torch.randn(3, 1, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16), attn_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="add_bias_kv"):
        make_traceable(nn.MultiheadAttention(16, 2, add_bias_kv=True))


def test_fx_and_the_swap_lower_the_rewritten_encoder_with_the_same_integers():
    torch.manual_seed(0)
    model = TorchEncoderViT(encoder=True).eval()
    batches = batches_of((2, 3, 32, 32), 3, seed=1)
    # stock prepare_fx keeps torch's encoder layer a leaf: the lowering refuses it by node (fxp.prepare and the
    # swap rewrite it themselves)
    with pytest.raises(fxp.LoweringError, match=r"node 'blocks_0' \(call_module blocks.0\).*no integer lowering"):
        prepared = prepare_fx(copy.deepcopy(model), fxp.get_iseg_qconfig_mapping(), (batches[0].float(),),
                              backend_config=fxp.get_iseg_backend_config())
        with torch.no_grad():
            prepared(batches[0].float())
        fxp.convert(prepared, (batches[0].float(),))
    int_model, swapped = both_paths(make_traceable(model), (2, 3, 32, 32), None, None, seed=1)
    x = batches[1]
    inputs = fxp.quantize_inputs(int_model, x)
    with torch.no_grad(), OpAudit() as audit:
        out = int_model(*inputs)
    assert audit.float_ops() == []
    with torch.no_grad():
        ref = model(x.float()).double()
        swap_out = swapped(x)
        xi = swapped.get_submodule("x_quant")(x).int()
    cos = F.cosine_similarity(out.double().flatten() * int_model.output_scales[0], ref.flatten(), 0)
    assert cos > 0.98
    lo, hi = int_model.input_formats[0][1]
    assert torch.equal(swap_out.int().long(), int_model(xi.to(torch.int8 if hi <= 127 else torch.int16)).long())
