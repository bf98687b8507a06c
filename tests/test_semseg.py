"""Semantic-segmentation evaluation: metrics, slide inference, background rule, dataset checks, the driver."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from densevlm.config import ConfigError, from_dict, load_config
from densevlm.config.semseg import SemSegDataConfig, SemSegEvalConfig, toyworld_data
from densevlm.data.semseg import SemSegDataError, SemSegDataset, list_samples, read_label, resize_short_side
from densevlm.evaluation.semseg import (
    SemSegEvaluator,
    compare_metrics,
    detectron2_available,
    evaluate_semseg,
    format_table,
    semseg_metrics,
)
from densevlm.segmenters import DenseCLIPSegmenter, Segmenter, add_background, predict, slide_windows
from densevlm.segmenters.inference import window_logits
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

# Class colours of the synthetic split: the oracle segmenter names a pixel after the nearest colour.
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220], [230, 210, 40]], dtype=np.uint8)
VOCAB = Vocabulary("four", (ClassEntry("cat"), ClassEntry("dog", novel=True), ClassEntry("sky", isthing=False),
                            ClassEntry("grass", isthing=False, novel=True)))


class ColourOracle(Segmenter):
    """Per-pixel (so translation-equivariant) scores: minus the distance of the pixel's colour to each class colour."""

    def __init__(self, colours: np.ndarray = COLOURS) -> None:
        super().__init__()
        self.class_names = [f"c{i}" for i in range(len(colours))]
        self.image_mean, self.image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.register_buffer("colours", torch.tensor(colours, dtype=torch.float32) / 255.0)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(images.shape))
        # Direct distances: cdist's matmul shortcut has ~1e-6 cancellation error that depends on the batch shape
        # (and the CPU's kernels), which would make windows and the whole image disagree for a numeric reason.
        pixels = images.permute(0, 2, 3, 1).flatten(1, 2)
        return -torch.cdist(pixels, self.colours[None], compute_mode="donot_use_mm_for_euclid_dist").view(
            images.shape[0], *images.shape[-2:], -1).permute(0, 3, 1, 2)


class PositionDependent(ColourOracle):
    """Not translation-equivariant: adds the window-relative column to every score of class 0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = super().forward(images)
        out[:, 0] += torch.linspace(0, 1, images.shape[-1])
        return out


def write_split(root: Path, labels: list[np.ndarray], *, stems: list[str] | None = None, palette: bool = False) -> SemSegDataConfig:
    """Images whose pixels have their class colour (ignore pixels grey) and the label PNGs, detectron2 layout."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    stems = stems or [f"{i:04d}" for i in range(len(labels))]
    for stem, label in zip(stems, labels):
        rgb = np.full((*label.shape, 3), 128, dtype=np.uint8)
        valid = label < len(COLOURS)
        rgb[valid] = COLOURS[label[valid]]
        Image.fromarray(rgb).save(root / "images" / f"{stem}.png")
        img = Image.fromarray(label.astype(np.uint8))
        if palette:
            img = img.convert("P")
            img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
        img.save(root / "labels" / f"{stem}.png")
    return SemSegDataConfig(image_root=str(root / "images"), label_root=str(root / "labels"), image_suffix=".png")


def random_labels(n: int, rng: np.random.Generator, shape=(37, 53)) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        label = np.zeros(shape, dtype=np.int64)
        h, w = shape
        for c in range(1, 4):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            label[y:y + int(rng.integers(5, h // 2)), x:x + int(rng.integers(5, w // 2))] = c
        label[rng.random(shape) < 0.02] = 255
        out.append(label)
    return out


def eval_cfg(tmp_path: Path, data: SemSegDataConfig, **inference) -> SemSegEvalConfig:
    vocab_file = tmp_path / "vocab.json"
    VOCAB.to_json(vocab_file)
    raw = {"output_dir": str(tmp_path / "out"), "model": {"name": "ToyCLIP-ViT-T-16"},
           "text": {"vocabulary": str(vocab_file), "templates": "single"},
           "inference": {"short_side": None, "max_long_side": None, "crop_size": 16, "stride": 10, "batch_size": 4,
                         **inference},
           "num_workers": 0, "device": "cpu", "figures": 2, "metrics_backend": "densevlm"}
    cfg = from_dict(SemSegEvalConfig, raw)
    cfg.data = data
    return cfg


# ---------------------------------------------------------------------- metrics


def test_perfect_prediction_scores_100_and_ignores_absent_classes():
    gt = torch.tensor([[0, 0, 1], [1, 255, 2]])
    ev = SemSegEvaluator(["a", "b", "c", "d"], novel=[False, True, False, True])
    ev.process([{"sem_seg": gt}], [{"pred": gt.clamp(max=3)}])
    m = ev.evaluate()["metrics"]
    assert m["mIoU"] == m["fwIoU"] == m["mACC"] == m["pACC"] == 100.0
    assert m["mIoU.seen"] == 100.0 and m["mIoU.novel"] == 100.0
    assert np.isnan(m["IoU-d"]) and np.isnan(m["ACC-d"])  # no ground truth: out of every mean


def test_known_confusion_gives_known_numbers():
    gt = torch.tensor([0, 0, 1, 1, 2, 2, 2, 255]).view(2, 4)
    pred = torch.tensor([0, 1, 1, 1, 2, 2, 3, 0]).view(2, 4)  # class 3 predicted but absent: no effect on means
    ev = SemSegEvaluator(["a", "b", "c", "d"])
    ev.process([{"sem_seg": gt}], [{"sem_seg": F.one_hot(pred, 4).permute(2, 0, 1).float()}])
    out = ev.evaluate()
    m = out["metrics"]
    iou = [1 / 2, 2 / 3, 2 / 3]
    assert m["IoU-a"] == pytest.approx(50.0) and m["IoU-b"] == pytest.approx(200 / 3)
    assert m["IoU-c"] == pytest.approx(200 / 3) and np.isnan(m["IoU-d"])  # d: no ground-truth pixel
    assert m["mIoU"] == pytest.approx(100 * np.mean(iou))
    assert m["fwIoU"] == pytest.approx(100 * (2 * iou[0] + 2 * iou[1] + 3 * iou[2]) / 7)
    assert m["pACC"] == pytest.approx(100 * 5 / 7)
    assert m["mACC"] == pytest.approx(100 * np.mean([1 / 2, 1, 2 / 3]))
    assert out["counts"]["pixels"] == 7  # the ignore pixel is not counted
    assert out["confusion"][2, 3] == 1 and out["confusion"][0, 1] == 1


def test_metrics_reject_bad_input():
    ev = SemSegEvaluator(["a", "b"])
    with pytest.raises(ValueError, match=r"value\(s\) \[7\]"):
        ev.process([{"sem_seg": torch.tensor([[0, 7]])}], [{"pred": torch.tensor([[0, 1]])}])
    with pytest.raises(ValueError, match="differ in size"):
        ev.process([{"sem_seg": torch.zeros(2, 2)}], [{"pred": torch.zeros(2, 3)}])
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        semseg_metrics(np.zeros((3, 3)), ["a", "b"])


@pytest.mark.skipif(not detectron2_available(),
                    reason="detectron2 is not installed: `make detectron2` installs the pure-Python build")
def test_confusion_matrix_agrees_with_detectron2_sem_seg_evaluator(tmp_path):
    from densevlm.evaluation.semseg import Detectron2SemSegEvaluator

    rng = np.random.default_rng(0)
    labels = random_labels(5, rng)
    data = write_split(tmp_path, labels)
    samples, _ = list_samples(data)
    records = [{"file_name": str(s.image), "sem_seg_file_name": str(s.label)} for s in samples]
    names = ["cat", "dog", "sky", "grass", "absent"]
    ours = SemSegEvaluator(names)
    theirs = Detectron2SemSegEvaluator("densevlm_test_agreement", records, names)
    for sample, label in zip(samples, labels):
        logits = torch.randn(5, *label.shape)
        truthful = torch.rand(label.shape) < 0.6  # mostly right, partly random: every metric is non-trivial
        pred_logits = logits.clone()
        gt = torch.as_tensor(np.where(label == 255, 0, label))
        pred_logits.scatter_(0, gt[None], torch.where(truthful, 10.0, -10.0)[None])
        inputs = [{"sem_seg": label, "file_name": str(sample.image)}]
        ours.process(inputs, [{"sem_seg": pred_logits}])
        theirs.process(inputs, [{"sem_seg": pred_logits}])
    a, b = ours.evaluate()["metrics"], theirs.evaluate()
    assert 0 < a["mIoU"] < 100 and np.isnan(a["IoU-absent"])
    assert compare_metrics(a, b, tol=1e-6) == []
    assert {"mIoU", "fwIoU", "mACC", "pACC", "IoU-cat"} <= set(b)


# ---------------------------------------------------------------------- inference protocol


def test_slide_windows_follow_mmseg():
    assert slide_windows(100, 80, 448, 224) == [(0, 100, 0, 80)]  # smaller than a window: the image
    assert slide_windows(448, 597, 448, 224) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    wins = slide_windows(37, 53, 16, 10)
    cover = np.zeros((37, 53), int)
    for y1, y2, x1, x2 in wins:
        assert (y2 - y1, x2 - x1) == (16, 16)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1 and len(wins) == 4 * 5
    assert resize_short_side((375, 500), 448, 2048) == (448, 597)
    assert resize_short_side((1024, 2048), 448, 2048) == (448, 896)
    assert resize_short_side((100, 5000), 448, 2048) == (41, 2048)  # long-side cap wins


def test_sliding_window_equals_full_image_for_a_translation_equivariant_segmenter():
    torch.manual_seed(0)
    image = torch.rand(3, 37, 53)  # not a multiple of the stride (10) nor of the crop (16)
    seg = ColourOracle()
    whole = window_logits(seg, [image], mode="whole")[0]
    slide = window_logits(seg, [image], mode="slide", crop_size=16, stride=10, batch_size=3)[0]
    assert torch.allclose(slide, whole, atol=1e-6)
    assert len(seg.calls) == 1 + 7 and seg.calls[1] == (3, 3, 16, 16)  # 20 windows, 3 per forward
    # The same check fails for a segmenter that is not translation-equivariant: the test can fail.
    pos = PositionDependent()
    assert not torch.allclose(window_logits(pos, [image], mode="slide", crop_size=16, stride=10)[0],
                              window_logits(pos, [image], mode="whole")[0], atol=1e-3)


def test_windows_of_several_images_are_batched_and_returned_per_image():
    torch.manual_seed(1)
    images = [torch.rand(3, 20, 30), torch.rand(3, 16, 16), torch.rand(3, 25, 17)]
    seg = ColourOracle()
    out = predict(seg, images, [(40, 60), (16, 16), (25, 17)], crop_size=16, stride=8, batch_size=64)
    assert [tuple(o.shape) for o in out] == [(4, 40, 60), (4, 16, 16), (4, 25, 17)]
    assert len(seg.calls) == 1  # all windows are 16x16: one forward
    assert torch.allclose(out[1], seg(images[1][None])[0], atol=1e-6)


def test_background_rule_inserts_a_constant_channel():
    logits = torch.tensor([[[0.1, 0.5]], [[0.3, 0.2]]])  # (C=2, 1, 2)
    with_bg = add_background(logits, 0, 0.25)
    assert with_bg.shape == (3, 1, 2) and torch.equal(with_bg[0], torch.full((1, 2), 0.25))
    assert with_bg.argmax(0).tolist() == [[2, 1]]
    assert add_background(logits, 0, 0.4).argmax(0).tolist() == [[0, 1]]  # below the threshold: background
    assert torch.equal(add_background(logits[None], 2, 0.0)[0, :2], logits)


def test_dense_clip_segmenter_scores_patches_at_the_input_size():
    from densevlm.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("ToyCLIP-ViT-T-16")
    text = torch.randn(5, model.embed_dim)
    seg = DenseCLIPSegmenter(model, text, [f"c{i}" for i in range(5)])
    one_patch = torch.randn(1, 3, 16, 16)
    expected = torch.einsum("bdhw,cd->bchw", model.encode_dense(one_patch), F.normalize(text, dim=-1))
    assert torch.allclose(seg(one_patch), expected.expand(1, 5, 16, 16), atol=1e-5)
    odd = torch.randn(2, 3, 21, 37)  # padded to 32x48 inside, cut back
    out = seg(odd)
    assert out.shape == (2, 5, 21, 37) and out.abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match=r"expected \(C, 128\)"):
        DenseCLIPSegmenter(model, torch.randn(5, 7), ["x"] * 5)


# ---------------------------------------------------------------------- data


def test_dataset_reads_palette_labels_and_reduce_zero_label(tmp_path):
    label = np.array([[0, 1, 2], [3, 255, 1]])
    data = write_split(tmp_path, [label], palette=True)
    assert read_label(Path(data.label_root) / "0000.png").tolist() == label.tolist()
    reduced = read_label(Path(data.label_root) / "0000.png", reduce_zero_label=True)
    assert reduced.tolist() == [[255, 0, 1], [2, 255, 0]]
    ds = SemSegDataset(data, 4, (0, 0, 0), (1, 1, 1), short_side=6, max_long_side=None)
    item = ds[0]
    assert item["image"].shape == (3, 6, 9) and item["label"].shape == (2, 3)


def test_bad_samples_are_named_or_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    data = write_split(tmp_path, random_labels(3, rng))
    os.remove(Path(data.label_root) / "0001.png")
    with pytest.raises(SemSegDataError, match=r"0001\.png has no .*labels/0001\.png"):
        list_samples(data)
    data.on_bad_sample = "skip"
    samples, missing = list_samples(data)
    assert [s.stem for s in samples] == ["0000", "0002"] and [s.stem for s in missing] == ["0001"]

    Image.fromarray(np.full((37, 53), 9, np.uint8)).save(Path(data.label_root) / "0000.png")  # value 9
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(Path(data.label_root) / "0002.png")  # wrong size
    strict = SemSegDataset(SemSegDataConfig(**{**data.__dict__, "on_bad_sample": "error"}), 4, (0,) * 3, (1,) * 3,
                           samples=samples)
    with pytest.raises(SemSegDataError, match=r"0000\.png: label value\(s\) \[9\].*0\.\.3"):
        strict[0]
    with pytest.raises(SemSegDataError, match=r"0002\.png is 53x37 .* is 10x10"):
        strict[1]
    lenient = SemSegDataset(data, 4, (0,) * 3, (1,) * 3)
    assert "skipped" in lenient[0] and "skipped" in lenient[1]
    with pytest.raises(SemSegDataError, match="the vocabulary has 4 classes, the dataset .* has 150"):
        SemSegDataset(SemSegDataConfig(**{**data.__dict__, "num_classes": 150}), 4, (0,) * 3, (1,) * 3)

    cfg = eval_cfg(tmp_path, data)
    result = evaluate_semseg(None, cfg, segmenter=ColourOracle(), progress=False)
    assert result["counts"] == {"images": 0, "skipped": 3, "pixels": 0}


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="stride: expected an integer in"):
        from_dict(SemSegEvalConfig, {"inference": {"crop_size": 16, "stride": 32}})
    with pytest.raises(ConfigError, match="ignore_label: 3 is a class index"):
        from_dict(SemSegEvalConfig, {"data": {"num_classes": 4, "ignore_label": 3}})
    with pytest.raises(ConfigError, match="data.label_root: required"):
        list_samples(SemSegDataConfig(image_root=str(tmp_path)))
    cfg = from_dict(SemSegEvalConfig, {"text": {"vocabulary": "ade20k_150"},
                                       "inference": {"background": {"enabled": True}}})
    with pytest.raises(ConfigError, match="exactly one class named 'background' in vocabulary 'ade20k_150'"):
        evaluate_semseg(None, cfg, segmenter=ColourOracle(), progress=False)
    for name in ("semseg_voc_21_eva02_b16.yaml", "semseg_pascal_context_60_eva02_b16.yaml"):
        c = load_config(SemSegEvalConfig, REPO / "configs" / "eval" / name)
        assert c.inference.background.enabled and c.data.num_classes in (21, 60)


# ---------------------------------------------------------------------- driver


def test_oracle_segmenter_scores_100_through_the_whole_pipeline(tmp_path):
    rng = np.random.default_rng(3)
    labels = random_labels(5, rng)
    cfg = eval_cfg(tmp_path, write_split(tmp_path / "data", labels))
    result = evaluate_semseg(None, cfg, segmenter=ColourOracle(), progress=False)
    m = result["metrics"]
    assert m["mIoU"] == pytest.approx(100.0) and m["pACC"] == pytest.approx(100.0)
    assert m["mIoU.seen"] == pytest.approx(100.0) and m["mIoU.novel"] == pytest.approx(100.0)
    assert result["counts"]["images"] == 5
    assert result["counts"]["pixels"] == sum(int((lab != 255).sum()) for lab in labels)
    out = Path(cfg.output_dir)
    assert json.loads((out / "semseg.json").read_text())["metrics"]["mIoU"] == pytest.approx(100.0)
    assert (out / "class_iou.png").stat().st_size > 0 and (out / "overlays.png").stat().st_size > 0
    assert len((out / "per_class.csv").read_text().splitlines()) == 1 + 4

    # Swap two class colours in the oracle: exactly those classes are confused, with a known IoU of 0.
    swapped = COLOURS[[1, 0, 2, 3]]
    result = evaluate_semseg(None, cfg, segmenter=ColourOracle(swapped), progress=False, write=False)
    m = result["metrics"]
    assert m["IoU-cat"] == 0.0 and m["IoU-dog"] == 0.0 and m["IoU-sky"] == pytest.approx(100.0)
    assert m["mIoU"] == pytest.approx(50.0) and m["mIoU.seen"] == pytest.approx(50.0)


def test_background_rule_in_the_driver(tmp_path):
    """VOC-21-style: class 0 'background' has no text embedding; a constant score above every class score wins."""
    labels = [np.array([[0, 1, 2, 3]] * 4)]
    data = write_split(tmp_path / "data", labels)
    vocab = Vocabulary("bg4", (ClassEntry("background", isthing=False), ClassEntry("dog"), ClassEntry("sky"),
                               ClassEntry("grass")))
    vocab.to_json(tmp_path / "bg4.json")
    cfg = eval_cfg(tmp_path, data)
    cfg.text.vocabulary = str(tmp_path / "bg4.json")
    cfg.inference.background.enabled = True
    cfg.inference.background.score = -0.01  # oracle scores are minus distances: exact colour matches beat it
    result = evaluate_semseg(None, cfg, segmenter=ColourOracle(COLOURS[1:]), progress=False, write=False)
    assert result["metrics"]["mIoU"] == pytest.approx(100.0)  # background pixels (red) match no class colour
    assert result["vocabulary"]["background_index"] == 0 and result["per_class"][0]["background_rule"]
    cfg.inference.background.score = 1.0  # above everything: all background
    result = evaluate_semseg(None, cfg, segmenter=ColourOracle(COLOURS[1:]), progress=False, write=False)
    assert result["metrics"]["IoU-background"] == pytest.approx(25.0) and result["metrics"]["pACC"] == 25.0


def test_model_handed_in_gets_its_mode_back_and_table_formats(tmp_path):
    from densevlm.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("ToyCLIP-ViT-T-16").train()
    cfg = eval_cfg(tmp_path, write_split(tmp_path / "data", random_labels(2, np.random.default_rng(0))))
    cfg.device = "auto"
    result = evaluate_semseg(model, cfg, progress=False, write=False)
    assert model.training and all(m.training for m in model.modules())
    assert 0 <= result["metrics"]["mIoU"] <= 100 and {"mIoU.seen", "mIoU.novel"} <= set(result["metrics"])
    table = format_table({"base": result, "tuned": result})
    assert table.splitlines()[1].split() == ["base", "tuned"] and "mIoU.novel" in table
    assert "grass" in format_table(result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_world(tmp_path: Path) -> Path:
    from densevlm.config.toyworld import ToyWorldConfig
    from densevlm.toyworld import generate_world

    root = tmp_path / "world"
    generate_world(from_dict(ToyWorldConfig, {"num_train": 2, "num_val": 7, "image_size": 64, "workers": 0}), root)
    return root


def _toy_recipe(tmp_path: Path, world: Path, weights: Path, name: str) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "eval" / "semseg_toy_quick.yaml").read_text())
    raw.pop("_base_")
    data = toyworld_data(world)
    raw.update({"output_dir": str(tmp_path / name), "model": {"name": "ToyCLIP-ViT-T-16", "pretrained": str(weights)},
                "data": {"image_root": data.image_root, "label_root": data.label_root, "num_classes": 28},
                "text": {"vocabulary": str(world), "templates": "single"}, "device": "cpu",
                "inference": {"short_side": 64, "mode": "slide", "crop_size": 48, "stride": 32, "batch_size": 4}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_quick_toy_profile_end_to_end_and_two_processes_equal_one(tmp_path):
    """The CLI on a toy world (slide windows, seen/novel), once in one process and once on 2 gloo processes."""
    from densevlm.cli import main
    from densevlm.models import create_backbone

    world = _toy_world(tmp_path)
    torch.manual_seed(0)
    weights = create_backbone("ToyCLIP-ViT-T-16").save_weights(tmp_path / "toy.safetensors")
    single = _toy_recipe(tmp_path, world, weights, "single")
    assert main(["eval", "semseg", "-c", str(single)]) == 0
    one = json.loads((tmp_path / "single" / "semseg.json").read_text())
    assert one["counts"]["images"] == 7 and one["timing"]["processes"] == 1
    assert len(one["per_class"]) == 28 and {"mIoU.seen", "mIoU.novel"} <= set(one["metrics"])
    assert one["vocabulary"]["novel"] > 0 and 0 <= one["metrics"]["mIoU"] <= 100
    if detectron2_available():  # the recipe's "auto" backend ran detectron2's evaluator beside ours, in agreement
        assert one["metrics_backend"] == "detectron2" and "detectron2_disagreement" not in one

    double = _toy_recipe(tmp_path, world, weights, "double")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "densevlm.cli", "eval", "semseg", "-c", str(double)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "double" / "semseg.json").read_text())
    assert two["timing"]["processes"] == 2
    assert two["metrics_backend"] == one["metrics_backend"]  # with detectron2: its evaluator gathers across ranks
    assert two["counts"] == one["counts"]
    for key, value in one["metrics"].items():
        assert (two["metrics"][key] is None) if value is None else two["metrics"][key] == pytest.approx(value, abs=1e-9)
