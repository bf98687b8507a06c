"""The detectron2 backbone: shapes and strides, the dense CLIP map it passes on, frozen weights, and a training
step of a GeneralizedRCNN (FPN) and of a SemanticSegmentor built with ``build_model(cfg)`` on a CPU."""

from __future__ import annotations

import pytest
import torch

from densevlm.integrations.detectron2 import INSTALL_HINT

try:
    import detectron2  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip(INSTALL_HINT, allow_module_level=True)

from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Boxes, Instances

from densevlm.integrations.detectron2 import add_densevlm_config, class_text_embeddings
from densevlm.models import create_backbone

torch.set_num_threads(1)
MODEL = "ToyCLIP-ViT-T-16"  # open_clip ViT, width 192, 4 blocks, patch 16, embed 128: random weights


def _cfg(backbone: str = "build_densevlm_backbone", **densevlm):
    cfg = get_cfg()
    add_densevlm_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.DENSEVLM.MODEL = MODEL
    cfg.MODEL.DENSEVLM.OUT_INDICES = [0, 1, 2, 3]
    for key, value in densevlm.items():
        setattr(cfg.MODEL.DENSEVLM, key, value)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [v * 255 for v in (0.48145466, 0.4578275, 0.40821073)]
    cfg.MODEL.PIXEL_STD = [v * 255 for v in (0.26862954, 0.26130258, 0.27577711)]
    return cfg


def test_pyramid_shapes_strides_and_clip_map():
    torch.manual_seed(0)
    backbone = build_backbone(_cfg())
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (192, 4), "res3": (192, 8), "res4": (192, 16), "res5": (192, 32), "clip": (128, 16)}
    assert backbone.size_divisibility == 32
    assert backbone.padding_constraints == {"size_divisibility": 32, "square_size": 0}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = backbone(x)
        for name, spec in shapes.items():
            assert tuple(out[name].shape) == (2, spec.channels, 64 // spec.stride, 96 // spec.stride), name
        # the clip map is the model's own dense path with the DenseVLM value path as last block (test_models checks
        # that path against open_clip's own forward), not the ordinary last block; res4 the tokens after block 2
        assert torch.allclose(out["clip"], backbone.clip.encode_dense(x, last_block="value"), atol=1e-6)
        assert (out["clip"] - backbone.clip.encode_dense(x, last_block="standard")).abs().max() > 1e-3
        maps, _ = backbone.clip.encode_dense_with_intermediates(x, [2])
        assert torch.equal(out["res4"], maps[0])


def test_frozen_clip_trainable_pyramid_and_unfrozen_option():
    frozen = build_backbone(_cfg())
    frozen.train()
    assert not frozen.clip.training and frozen.to_stride4.training
    assert not any(p.requires_grad for p in frozen.clip.parameters())
    out = frozen(torch.randn(1, 3, 32, 32))
    (out["res2"].sum() + out["res3"].sum()).backward()
    assert frozen.to_stride4[0].weight.grad is not None and frozen.to_stride8.weight.grad is not None
    tuned = build_backbone(_cfg(FROZEN=False))
    tuned.train()
    tuned(torch.randn(1, 3, 32, 32))["clip"].sum().backward()
    assert tuned.clip.training
    assert tuned.clip.clip.visual.transformer.resblocks[3].mlp.c_fc.weight.grad is not None


def test_token_stride_rescales_other_patch_sizes():
    """A patch-8 ViT still gives strides 4/8/16/32: it sees the image at half size (8 px per 16 input px)."""
    from densevlm.config.model import ModelSpec
    from densevlm.integrations.detectron2 import DenseVLMBackbone

    small = create_backbone(ModelSpec(name="ViT-B-16", model_overrides={
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 4, "width": 64, "head_width": 32},
        "text_cfg": {"context_length": 8, "width": 32, "heads": 1, "layers": 1}}))
    backbone = DenseVLMBackbone(small, token_stride=16)
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 32))
    assert tuple(out["res4"].shape[-2:]) == (4, 2) and tuple(out["res2"].shape[-2:]) == (16, 8)
    with pytest.raises(ValueError, match="not divisible by TOKEN_STRIDE 16"):
        backbone(torch.randn(1, 3, 40, 32))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match=r"OUT_INDICES: expected 4 block indices in \[0, 4\), got \[0, 1, 9, 3\]"):
        build_backbone(_cfg(OUT_INDICES=[0, 1, 9, 3]))
    with pytest.raises(ValueError, match="LAST_BLOCK"):
        build_backbone(_cfg(LAST_BLOCK="qk"))


def _detection_cfg():
    cfg = _cfg("build_densevlm_fpn_backbone")
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 256
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    return cfg


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def test_generalized_rcnn_trains_a_step_on_cpu():
    torch.manual_seed(0)
    model = build_model(_detection_cfg())
    model.train()
    inputs = []
    for i, (h, w) in enumerate([(64, 96), (96, 64)]):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 8.0, 40.0, 50.0], [20.0, 10.0, 60.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        inputs.append({"image": _image(h, w, i), "instances": inst, "height": h, "width": w})
    from detectron2.utils.events import EventStorage

    with EventStorage(0):  # GeneralizedRCNN logs training statistics there, as detectron2's trainers provide
        losses = model(inputs)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    backbone = model.backbone
    assert backbone.bottom_up.to_stride4[0].weight.grad is not None  # the pyramid trains
    assert backbone.fpn_lateral2.weight.grad is not None
    assert all(p.grad is None for p in backbone.bottom_up.clip.parameters())  # the CLIP stays frozen
    model.eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
        detections = model([{"image": _image(64, 64, 5)}])
    assert set(features) == {"p2", "p3", "p4", "p5", "p6", "clip"} and features["clip"].shape == (1, 128, 4, 4)
    assert set(detections[0]) == {"instances"}


def test_semantic_segmentor_trains_a_step_on_cpu():
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.NORM = ""
    model = build_model(cfg)
    model.train()
    inputs = [{"image": _image(64, 64, i), "sem_seg": torch.randint(0, 4, (64, 64))} for i in range(2)]
    losses = model(inputs)
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    losses["loss_sem_seg"].backward()
    assert model.sem_seg_head.predictor.weight.grad is not None
    assert model.backbone.to_stride4[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([{"image": _image(64, 96, 7), "height": 32, "width": 48}])
    assert out[0]["sem_seg"].shape == (4, 32, 48)


def test_class_text_embeddings_from_metadata():
    from detectron2.data import MetadataCatalog

    backbone = build_backbone(_cfg())
    meta = MetadataCatalog.get("densevlm_test_toy_classes")
    meta.set(thing_classes=["cat", "wardrobe, closet", "traffic light"], stuff_classes=["sky", "wall"])
    emb = class_text_embeddings(backbone, "densevlm_test_toy_classes", templates="single")
    assert emb.shape == (3, 128) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    stuff = class_text_embeddings(backbone, meta, kind="stuff", templates="single")
    assert stuff.shape == (2, 128)
    # "wardrobe, closet" is one class with a synonym, embedded name by name as the built-in vocabularies are
    from densevlm.vocab import ClassEntry, Vocabulary, build_text_embeddings, get_templates

    by_hand = Vocabulary("by-hand", (ClassEntry("cat"), ClassEntry("wardrobe", synonyms=("closet",)),
                                     ClassEntry("traffic light")))
    expected = build_text_embeddings(backbone.clip, by_hand, get_templates("single"), progress=False)
    assert torch.allclose(emb, expected, atol=1e-6)
    one_name = build_text_embeddings(backbone.clip, Vocabulary("one", (ClassEntry("wardrobe"),)),
                                     get_templates("single"), progress=False)
    assert not torch.allclose(emb[1], one_name[0], atol=1e-3)
    with pytest.raises(ValueError, match="has no 'stuff_classes'"):
        class_text_embeddings(backbone, MetadataCatalog.get("densevlm_test_empty"), kind="stuff")
