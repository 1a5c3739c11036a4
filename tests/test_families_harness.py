"""benchmarks/families.py (issue 39's acceptance harness): one family failing does not stop the others, and every
(family, front end) gets a row with an outcome; its report names what blocks a refused family."""
import importlib.util

import pytest
import torch
from torch import nn

from helpers import families_harness

needs_photos = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                  reason="scikit-image's photos are not installed: `make test` installs them")


@pytest.fixture(scope="module")
def families():
    return families_harness()


class Gated(nn.Module):
    """A patch embedding, then torch.cumsum (no registry entry): refused by node in every front end."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cumsum(self.fc(t), -1)


@needs_photos
def test_a_failing_family_does_not_stop_the_others(families, monkeypatch, tmp_path):
    def broken():
        raise RuntimeError("no such config")

    monkeypatch.setitem(families.FAMILIES, "broken", ("a family whose model cannot be built", broken))
    monkeypatch.setitem(families.FAMILIES, "gated", ("Linear -> cumsum", lambda: (Gated(), 32, "features")))
    rows = []
    for name in ("broken", "gated", "torch-encoder"):
        rows += families.run_family(name, timeout=300, front_ends=("pt2e", "fx"))
    by = {(r["family"], r["front_end"]): r for r in rows}
    assert by["broken", "pt2e"]["outcome"] == "skipped" and "no such config" in by["broken", "pt2e"]["reason"]
    assert by["gated", "pt2e"]["outcome"] == by["gated", "fx"]["outcome"] == "refused"
    assert "cumsum" in by["gated", "pt2e"]["node"] and by["gated", "fx"]["blockers"] == {"cumsum": 1}
    encoder = by["torch-encoder", "pt2e"]
    assert encoder["outcome"] == "integer-only" and encoder["float_ops"] == 0 and encoder["cosine"] > 0.95
    assert encoder["saturation"] == 0.0 and 0 <= encoder["agreement"] <= 1
    assert by["torch-encoder", "fx"]["outcome"] == "integer-only"  # (fxp.prepare rewrites torch's encoder layers)
    families.write_report(rows, tmp_path, 1.0)
    md = (tmp_path / "families.md").read_text()
    assert "| gated | pt2e | refused |" in md and "cumsum" in md
    assert (tmp_path / "families.json").is_file()


def test_blocker_categories(families):
    cat = families._category
    assert cat("depthwise conv2d k(3, 3) s(1, 1) p(1, 1) g32") == "depthwise conv2d"
    assert cat("conv2d k(7, 7) s(4, 4) p(3, 3)") == "general conv2d (padding, stride != kernel)"
    assert cat("aten.relu_.default") == "ReLU / clamp" and cat("ConvTranspose2d k(2, 2) s(2, 2)") == "ConvTranspose2d"
    assert cat("aten.adaptive_avg_pool1d.default") == "adaptive avg pool"
    assert all(c in families.REMEDY for c in ("depthwise conv2d", "ReLU / clamp", "adaptive avg pool", "ConvTranspose2d"))


@needs_photos
def test_the_control_goes_through_fx_and_the_swap_with_the_same_integers(families):
    rows = {r["front_end"]: r for r in families.run_family("control-vit", timeout=300, front_ends=("fx", "swap"))}
    assert rows["fx"]["outcome"] == "integer-only" and rows["fx"]["float_ops"] == 0
    assert rows["swap"]["outcome"] == "swapped" and rows["swap"]["same_integers_as_fx"] is True
    assert abs(rows["swap"]["cosine"] - rows["fx"]["cosine"]) < 0.01


FAMILIES = ("deit", "beit-eager", "beit-sdpa", "beit-seg", "swin", "segformer", "clip", "siglip", "vit-mae", "dpt",
            "dinov2-reg", "torch-encoder", "mmseg-segformer", "mmseg-upernet-vit")


@needs_photos
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_integer_only_or_refused_by_node_through_pt2e(families, family):
    """Issue 39's bar through the README's PT2E route: integer-only (0 float ops, no output at the INT16 limits, close
    to the float model) or a refusal naming the node; never a crash, never a float op left in a converted model."""
    (row,) = families.run_family(family, timeout=600, front_ends=("pt2e",))
    assert row["outcome"] in ("integer-only", "refused"), row
    if row["outcome"] == "refused":
        assert row["node"] and "node '" in row["reason"]
        return
    assert row["float_ops"] == 0 and row["saturation"] == 0.0
    assert row["cosine"] >= 0.99, row
    if row.get("agreement") is not None:  # (per pixel for segmenters; a classifier's 8 photos: one is 12.5 %)
        assert row["agreement"] >= (0.95 if row["kind"] == "segmenter" else 0.75), row
