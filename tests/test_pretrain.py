"""Contrastive pre-training on a COCO-captions dataset (a tiny toy world): loss goes down, weights reload exactly."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from densevlm.config import from_dict
from densevlm.config.pretrain import PretrainConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.data.captions import CaptionDataset
from densevlm.engine.checkpoint import latest_checkpoint, load_checkpoint
from densevlm.data.images import ImageReadError


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from densevlm.toyworld import generate_world

    root = tmp_path_factory.mktemp("pretrain") / "world"
    generate_world(ToyWorldConfig(num_train=64, num_val=16, image_size=96, workers=0), root, progress=False)
    return root


def _cfg(world: Path, out: Path) -> PretrainConfig:
    return from_dict(PretrainConfig, {
        "output_dir": str(out),
        "model": {"name": "ToyCLIP-ViT-T-16"},
        "data": {"captions_json": str(world / "annotations" / "captions_train.json"),
                 "image_root": str(world / "images" / "train"), "image_size": 64},
        "eval": {"panoptic_json": str(world / "annotations" / "panoptic_val.json"),
                 "image_root": str(world / "images" / "val"), "vocabulary": str(world), "templates": "single"},
        "loop": {"epochs": 4, "batch_size": 16, "num_workers": 0, "log_every": 1, "cpu": True},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
    })


def test_pretraining_lowers_the_loss_and_weights_reload_identically(world, tmp_path):
    from densevlm.tasks.pretrain import run_pretrain
    from densevlm.models import create_backbone

    cfg = _cfg(world, tmp_path / "run")
    result = run_pretrain(cfg)
    history = result.metrics["history"]
    assert len(history) == 4 and result.global_step == 16
    assert history[-1]["train"]["loss"] < 0.8 * history[0]["train"]["loss"]
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert {"zeroshot.thing.top1", "zeroshot.stuff.top1", "zeroshot.images"} <= set(final)
    assert (tmp_path / "run" / "figures" / "zero_shot_confusion_thing.png").stat().st_size > 10_000

    weights = tmp_path / "run" / "weights.safetensors"
    plain = open_clip.create_model("ToyCLIP-ViT-T-16", pretrained=str(weights)).eval()
    ours = create_backbone(str(tmp_path / "run"))
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt["epoch"] == 3 and ckpt["epoch_complete"]
    trained = create_backbone("ToyCLIP-ViT-T-16")
    trained.load_state_dict(ckpt["model"])
    x = torch.randn(2, 3, 96, 96)  # plain open_clip runs only at the native size
    tokens = ours.tokenizer(["a red boat on the water", "grass"])
    with torch.no_grad():
        for m in (plain, trained.eval()):
            assert torch.equal(ours.encode_image(x), m.encode_image(x))
            assert torch.equal(ours.encode_text(tokens), m.encode_text(tokens))


def test_missing_image_is_named_or_skipped_and_counted(world, tmp_path):
    data = json.loads((world / "annotations" / "captions_train.json").read_text())
    data["images"][3]["file_name"] = "nope.jpg"
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ImageReadError, match=r"nope\.jpg.*skip_bad_images"):
        CaptionDataset(bad, world / "images" / "train", 64)
    ds = CaptionDataset(bad, world / "images" / "train", 64, skip_bad_images=True)
    assert ds.skipped == 1 and len(ds) == 63


def test_cli_refuses_an_existing_run_directory(world, tmp_path, capsys):
    from densevlm.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["pretrain", "--set", f"output_dir={out}",
            f"data.captions_json={world / 'annotations' / 'captions_train.json'}",
            f"data.image_root={world / 'images' / 'train'}"]
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["pretrain", "--set", "loop.epochz=3"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_context_only_predictor_names_the_commonest_thing_on_each_stuff():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "probe_supervised_ceiling.py"
    spec = importlib.util.spec_from_file_location("probe_supervised_ceiling", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    context_only_top1 = probe.context_only_top1
    # train: stuff 0 carries thing 2 twice and thing 1 once; stuff 1 carries thing 3; stuff 7 is unseen in train
    acc = context_only_top1([0, 0, 0, 1], torch.tensor([2, 2, 1, 3]), [0, 1, 7, 0], torch.tensor([2, 3, 2, 1]))
    assert acc == 75.0  # 2 right, 3 right, unseen stuff -> commonest thing overall (2) right, 1 wrong


def test_supervised_ceiling_probe_runs_and_reports(world):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "tools" / "probe_supervised_ceiling.py"), "--world", str(world),
         "--steps", "4", "--batch-size", "8", "--image-size", "64", "--warmup-steps", "1", "--eval-every", "2",
         "--threads", "1"],
        check=True, capture_output=True, text=True,
    ).stdout
    report = json.loads(out)
    assert report["steps"] == 4 and report["images_seen"] == 32 and report["thing_classes"] == 20
    assert [c["step"] for c in report["curve"]] == [2, 4]
    assert 0.0 <= report["val_top1_largest_thing"] <= 100.0
    assert report["chance_top1"] == 5.0
    assert report["val_images"] <= 16 and report["train_images"] <= 64


class _GivenFeatures(torch.nn.Module):
    """A 'CLIP' whose image and text encoders return their input: the batch's images and tokens ARE the features."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(10.0).log())

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_contrastive_loss_per_rank_uses_the_global_label_offset(monkeypatch):
    """Two ranks simulated by hand: rank r holds pairs r*B .. r*B+B-1 of a global batch of 2B; with every rank's
    features gathered, its loss is CLIP's loss on its own rows of the global logits, whose positives sit at columns
    r*B + i (labels = arange(B) + r*B), and the two ranks' losses average to the global batch's CLIP loss."""
    import torch.nn.functional as F

    import densevlm.methods.contrastive as contrastive
    from densevlm.engine.step_module import StepModule

    b = 3
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(2 * b, 8, generator=g), torch.randn(2 * b, 8, generator=g)
    image_n, text_n = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    logits = 10.0 * image_n @ text_n.t()  # the global batch's logits, images by rows
    labels = torch.arange(2 * b)
    global_loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    model = StepModule(_GivenFeatures())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    losses = []
    for rank in (0, 1):
        rows = slice(rank * b, rank * b + b)

        def gather(x, rank=rank, rows=rows):  # every rank's shard in rank order, this rank's own (with grad) in place
            full = image_n if torch.allclose(x, image_n[rows]) else text_n
            return torch.cat([x if r == rank else full[r * b:r * b + b] for r in (0, 1)])

        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(contrastive, "_gather_with_grad", gather)
        out = contrastive.ContrastiveObjective()(model, {"images": images[rows], "tokens": texts[rows]})
        expected = 0.5 * (F.cross_entropy(logits[rows], labels[rows]) + F.cross_entropy(logits.t()[rows], labels[rows]))
        torch.testing.assert_close(out.loss.detach(), expected)
        losses.append(out.loss.detach())
    torch.testing.assert_close((losses[0] + losses[1]) / 2, global_loss)
