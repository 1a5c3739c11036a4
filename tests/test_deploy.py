"""The deployed Segmenter, derived from the float one op by op: integer-only (audited), bit-exact with
its fake-quant form, close to the float model, and a file that is data (checked, safe to load)."""
import pytest
import torch
from mmseg.structures import SegDataSample

from iseg_plugin.deploy import OpAudit, calibrate_prepared, convert, prepare_segmenter
from iseg_plugin.deploy.io import FORMAT, DeployedFileError, load_deployed, save_deployed
from iseg_plugin.files import content_digest
from iseg_plugin.lowering import LoweringError

from test_quant_model import build, images, trained_like

VARIANTS = [  # (GELU, softmax), decoder options
    (("poly", "bit-exp"), {"l2_norm": True, "upsample": "bilinear"}),  # the plugin's default
    (("lambda-shift", "shift"), {}),  # I-Segmenter's operators, the paper's decoder (nearest, no L2)
    (("shift", "shift"), {}),
]


def pixels(n, seed):
    return (images(n, seed=seed) * 127.5 + 127.5).round().byte()  # BGR, as mmseg loads images


def batch(images_bgr):
    return dict(inputs=list(images_bgr), data_samples=[SegDataSample() for _ in range(len(images_bgr))])


def deployed_pair(variants=("poly", "bit-exp"), head_extra=None, size=(64, 64)):
    """A float Segmenter with trained-like weights and its deployed form (calibrated on 4 images)."""
    model = trained_like(build(None, **(head_extra or {}))).eval()
    calib = pixels(4, 1)
    example = model.data_preprocessor(batch(calib[:1]), False)["inputs"][..., : size[0], : size[1]]
    prepared = prepare_segmenter(model, example, *variants)
    assert calibrate_prepared(prepared, model.data_preprocessor, [batch(calib)], 4, show_progress=False) == 4
    preproc = model.data_preprocessor
    return model, convert(prepared, example, preproc.mean.flatten().tolist(), preproc.std.flatten().tolist())


@pytest.mark.parametrize("variants,head_extra", VARIANTS)
def test_deployed_is_integer_only_bit_exact_and_close_to_float(variants, head_extra, gemm_path):
    model, deployed = deployed_pair(variants, head_extra)
    assert all(not t.dtype.is_floating_point for t in deployed.state_dict().values())
    test = pixels(2, 5)
    rgb = test.flip(1).contiguous()  # the preprocessor turns BGR into RGB
    with torch.no_grad():
        with OpAudit() as audit:
            logits, classes = deployed(rgb)
        fake_logits, fake_classes = deployed.fake_quant(rgb)
        float_logits = model._forward(model.data_preprocessor(batch(test), False)["inputs"])
    assert len(audit.records) > 100 and audit.float_ops() == []  # no float tensor created or consumed
    assert fake_logits.dtype == torch.float64 and torch.equal(logits.long(), fake_logits.long())
    assert torch.equal(classes, fake_classes)
    state = set(deployed.state_dict())
    with torch.no_grad(), OpAudit() as audit:  # the class map alone: the last upsampling and the argmax in one pass
        assert torch.equal(deployed.predict(rgb), classes)
    assert deployed._split_last_upsample() is not None and audit.float_ops() == []
    assert set(deployed.state_dict()) == state  # (the split graph is a cache, not state)
    real = logits.double() * deployed.logit_scale
    cosine = torch.nn.functional.cosine_similarity(real.flatten(), float_logits.double().flatten(), 0)
    assert cosine > 0.97, float(cosine)


def test_audit_catches_a_float_op():
    with OpAudit() as audit:
        torch.arange(4) * 0.5
    assert audit.float_ops() and "mul" in audit.float_ops()[0].op


def test_numpy_images_are_taken_as_read():
    _, deployed = deployed_pair()
    rgb = pixels(2, 7).flip(1).contiguous()
    hwc = rgb.permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        assert torch.equal(deployed(hwc)[0], deployed(rgb)[0])
        assert torch.equal(deployed(hwc[0])[1], deployed(rgb[:1])[1])


def test_save_and_load_round_trip(tmp_path):
    _, deployed = deployed_pair()
    path = tmp_path / "model.iseg"
    assert save_deployed(deployed, path) > 0
    again = load_deployed(path)
    x = pixels(1, 7).flip(1).contiguous()
    with torch.no_grad():
        assert torch.equal(again(x)[0], deployed(x)[0])
    assert again.input_size == deployed.input_size and again.logit_scale == deployed.logit_scale


def test_bad_inputs_and_files(tmp_path):
    model, deployed = deployed_pair()
    with pytest.raises(TypeError, match="uint8"):
        deployed(torch.rand(1, 3, 64, 64))
    with pytest.raises(TypeError, match=r"must be uint8 RGB \(H, W, 3\).*got uint8 \(1, 3, 64, 64\)"):
        deployed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8).numpy())
    with pytest.raises(TypeError, match="got list"):
        deployed([torch.zeros(3, 64, 64, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="built for"):
        deployed(torch.zeros(1, 3, 48, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="built for"):
        deployed(torch.zeros(0, 3, 64, 64, dtype=torch.uint8))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(DeployedFileError, match="not a readable deployed model"):
        load_deployed(bad)
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(DeployedFileError, match="not an iseg deployed model"):
        load_deployed(bad)
    torch.save({"format": "iseg-deployed-v1", "tree": {}, "state_dict": {}}, bad)
    with pytest.raises(DeployedFileError, match="v1 file.*iseg ptq"):
        load_deployed(bad)
    with pytest.raises(FileNotFoundError):
        load_deployed(tmp_path / "missing.iseg")
    example = torch.zeros(1, 3, 64, 64)
    with pytest.raises(LoweringError, match="saw no data"):
        convert(prepare_segmenter(model, example), example, [0.0] * 3, [1.0] * 3)


def test_a_damaged_file_is_refused_whole(tmp_path):
    _, deployed = deployed_pair()
    path = tmp_path / "model.iseg"
    save_deployed(deployed, path)
    blob = torch.load(path, weights_only=True)
    name = next(k for k, v in blob["state_dict"].items() if v.numel() > 100)
    blob["state_dict"][name].view(-1)[7] += 1  # one integer changed in one weight
    torch.save(blob, path)
    with pytest.raises(DeployedFileError, match="damaged"):
        load_deployed(path)


def test_a_file_names_only_allowed_ops(tmp_path):
    _, deployed = deployed_pair()
    path = tmp_path / "model.iseg"
    save_deployed(deployed, path)
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == FORMAT
    node = next(n for n in blob["model"]["graph"]["nodes"] if n["op"] == "call_function")
    node["target"] = "os.system"
    blob["sha256"] = content_digest([blob["format"], blob["model"]], blob["state_dict"])  # a made file, not damage
    torch.save(blob, path)
    with pytest.raises(DeployedFileError, match="os.system.*not an allowed integer op"):
        load_deployed(path)
