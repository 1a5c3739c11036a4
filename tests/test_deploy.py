"""The deployed model: integer-only (audited), bit-exact with the fake-quant model, safe to load."""
import pytest
import torch
from mmseg.structures import SegDataSample

from iseg_plugin.deploy import OpAudit, convert
from iseg_plugin.deploy.io import DeployedFileError, load_deployed, save_deployed
from iseg_plugin.mmseg import calibrate
from iseg_plugin.quant import NotCalibratedError

from test_quant_model import build, images, trained_like

VARIANTS = [
    ({}, {}),  # the plugin's default: lambda-ShiftGELU, Shiftmax, no L2, nearest, INT16 logits, asymmetric GELU out
    ({"scores_bits": 8, "gelu_out_asymmetric": False}, {}),  # the paper's bit map
    ({"gelu": "poly", "softmax": "bit-exp"}, {"l2_norm": True, "upsample": "bilinear"}),
    ({"gelu": "shift"}, {}),
]


def pixels(n, seed):
    return (images(n, seed=seed) * 127.5 + 127.5).round().byte()  # BGR, as mmseg loads images


def deployed_pair(quant, head_extra):
    float_model, model = build(None, **head_extra), build(quant, **head_extra)
    trained_like(float_model)
    model.load_state_dict(float_model.state_dict(), strict=False)
    batch = dict(inputs=list(pixels(4, 1)), data_samples=[SegDataSample() for _ in range(4)])
    calibrate(model, [batch], num_samples=4, show_progress=False)
    return model, convert(model, (64, 64))


@pytest.mark.parametrize("quant,head_extra", VARIANTS)
def test_deployed_is_integer_only_and_bit_exact(quant, head_extra):
    model, deployed = deployed_pair(quant, head_extra)
    assert all(not t.dtype.is_floating_point for t in deployed.state_dict().values())
    test = pixels(2, 5)
    data = model.data_preprocessor(dict(inputs=list(test), data_samples=[SegDataSample() for _ in range(2)]), False)
    with torch.no_grad():
        fake = model.decode_head.forward_quant(model.backbone(data["inputs"]))
        with OpAudit() as audit:
            logits, classes = deployed(test.flip(1).contiguous())  # the preprocessor turns BGR into RGB
    assert len(audit.records) > 100
    assert audit.float_ops() == []  # no floating-point tensor created or consumed
    assert torch.equal(logits.long(), fake.value.long())
    assert torch.equal(classes, fake.value.argmax(1))


def test_audit_catches_a_float_op():
    with OpAudit() as audit:
        torch.arange(4) * 0.5
    assert audit.float_ops() and "mul" in audit.float_ops()[0].op


def test_save_and_load_round_trip(tmp_path):
    _, deployed = deployed_pair({}, {})
    path = tmp_path / "model.iseg"
    size = save_deployed(deployed, path)
    assert size > 0
    again = load_deployed(path)
    x = pixels(1, 7).flip(1).contiguous()
    with torch.no_grad():
        assert torch.equal(again(x)[0], deployed(x)[0])


def test_bad_inputs_and_files(tmp_path):
    model, deployed = deployed_pair({}, {})
    with pytest.raises(TypeError, match="uint8"):
        deployed(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="built for"):
        deployed(torch.zeros(1, 3, 48, 64, dtype=torch.uint8))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(DeployedFileError, match="not a readable deployed model"):
        load_deployed(bad)
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(DeployedFileError, match="not an iseg deployed model"):
        load_deployed(bad)
    with pytest.raises(FileNotFoundError):
        load_deployed(tmp_path / "missing.iseg")
    uncalibrated = build({})
    uncalibrated.eval()
    from iseg_plugin.quant import set_observing

    set_observing(uncalibrated, False)
    with pytest.raises(NotCalibratedError):
        convert(uncalibrated, (64, 64))
