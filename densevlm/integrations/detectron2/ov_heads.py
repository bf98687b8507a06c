"""F-ViT's open-vocabulary detector in detectron2: a text-embedding box classifier and the VLM branch.

``OpenVocabRCNN`` (``META_ARCH_REGISTRY``) is detectron2's ``GeneralizedRCNN`` whose ROI heads are
``OpenVocabROIHeads`` (``ROI_HEADS_REGISTRY``, a ``StandardROIHeads``) with ``OpenVocabOutputLayers`` as box
predictor:

* the classifier is ``T * cos(W x, e_c)`` over the class text embeddings ``e_c`` (from the backbone's own text
  tower, or a file) and a background embedding (initialised from the text "background", learned with
  ``LEARN_BACKGROUND``), with a learned temperature ``T`` (F-ViT's ``learned_temperature=50``);
* training scores the base classes and background only (novel columns are masked out of the softmax), so the
  detector never learns to reject a novel class; box regression is class-agnostic;
* at test time every class is scored, and the VLM branch (RoIAlign 1x1 of each box on the frozen dense CLIP map,
  ``VLM_TEMPERATURE`` x cosine, softmax) is fused geometrically: ``p^(1-ALPHA) * p_vlm^ALPHA`` for base classes and
  background, ``p^(1-BETA) * p_vlm^BETA`` for novel classes (F-ViT's ``FViTBBoxHead``; alpha 0.1, beta 0.8 for
  OV-COCO).

Class names and the novel split come from the metadata of ``DATASETS.TEST[0]`` (else ``DATASETS.TRAIN[0]``):
``thing_classes`` and ``novel_classes`` (see :mod:`densevlm.integrations.detectron2.datasets`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, GeneralizedRCNN, StandardROIHeads
from detectron2.modeling import build_backbone, build_proposal_generator
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Instances
from torch import nn

from densevlm.integrations.detectron2.backbone import CLIP_MAP
from densevlm.models.pooling import pool_boxes

BACKGROUND_PROMPT = "background"


def add_ov_detector_config(cfg: CN) -> CN:
    """Add ``MODEL.OV_DETECTOR`` (in place; returns ``cfg``). Keys as in the module docstring, plus TEMPLATES (prompt
    set of the class embeddings) and CLASS_EMBEDDINGS (a precomputed ``.safetensors`` / ``.npy``, one row per
    class in ``thing_classes`` order; empty: built from the backbone's text tower)."""
    cfg.MODEL.OV_DETECTOR = CN()
    cfg.MODEL.OV_DETECTOR.LEARNED_TEMPERATURE = 50.0
    cfg.MODEL.OV_DETECTOR.LEARN_BACKGROUND = True
    cfg.MODEL.OV_DETECTOR.VLM_BRANCH = True
    cfg.MODEL.OV_DETECTOR.VLM_TEMPERATURE = 75.0
    cfg.MODEL.OV_DETECTOR.ALPHA = 0.1
    cfg.MODEL.OV_DETECTOR.BETA = 0.8
    cfg.MODEL.OV_DETECTOR.TEMPLATES = "vild"
    cfg.MODEL.OV_DETECTOR.CLASS_EMBEDDINGS = ""
    return cfg


def fuse_scores(probs: torch.Tensor, vlm_probs: torch.Tensor, novel: torch.Tensor, alpha: float,
                beta: float) -> torch.Tensor:
    """F-ViT's geometric ensemble of (N, K+1) detector and VLM probabilities; ``novel`` is a (K+1,) bool mask
    (background counts as base). The result is not renormalised, as in F-ViT."""
    exponent = torch.where(novel, torch.full_like(novel, beta, dtype=probs.dtype),
                           torch.full_like(novel, alpha, dtype=probs.dtype))
    return probs.pow(1 - exponent) * vlm_probs.pow(exponent)


class OpenVocabOutputLayers(FastRCNNOutputLayers):
    """detectron2's Fast R-CNN predictor with the text-embedding classifier (see the module docstring).

    ``class_embeddings``: (K, D) unit-norm class embeddings; ``background_embedding``: (D,); ``novel``: K flags.
    Other keyword arguments are ``FastRCNNOutputLayers``'.
    """

    def __init__(self, input_shape: ShapeSpec, *, class_embeddings: torch.Tensor, background_embedding: torch.Tensor,
                 novel: Sequence[bool], learned_temperature: float = 50.0, learn_background: bool = True,
                 vlm_temperature: float = 75.0, alpha: float = 0.1, beta: float = 0.8, **kwargs: Any) -> None:
        num_classes, dim = class_embeddings.shape
        if len(novel) != num_classes:
            raise ValueError(f"novel: {len(novel)} flags for {num_classes} class embeddings")
        if background_embedding.shape != (dim,):
            raise ValueError(f"background embedding: expected ({dim},), got {tuple(background_embedding.shape)}")
        super().__init__(input_shape, num_classes=num_classes, **kwargs)
        del self.cls_score  # replaced by a projection into the text space
        input_size = input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
        self.cls_proj = nn.Linear(input_size, dim)
        nn.init.normal_(self.cls_proj.weight, std=0.01)
        nn.init.constant_(self.cls_proj.bias, 0)
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        background = F.normalize(background_embedding.float(), dim=0)
        if learn_background:
            self.background_embedding = nn.Parameter(background)
        else:
            self.register_buffer("background_embedding", background)
        # log-parametrised so it stays positive; F-ViT learns the temperature itself
        self.log_temperature = nn.Parameter(torch.tensor(math.log(learned_temperature)))
        # (K+1,) masks: novel classes, and the columns scored in training (base + background)
        self.register_buffer("novel", torch.tensor([*novel, False], dtype=torch.bool), persistent=False)
        self.vlm_temperature = float(vlm_temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def classifier(self) -> torch.Tensor:
        """(K+1, D) unit-norm rows: the classes, then background."""
        return torch.cat([self.class_embeddings, F.normalize(self.background_embedding, dim=0)[None]], dim=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        embedded = F.normalize(self.cls_proj(x), dim=-1)
        scores = self.log_temperature.exp() * embedded @ self.classifier().to(embedded.dtype).t()
        if self.training:  # base classes only: a novel column never enters the softmax
            scores = scores.masked_fill(self.novel, float("-inf"))
        return scores, self.bbox_pred(x)

    def vlm_probabilities(self, region_features: torch.Tensor) -> torch.Tensor:
        """(N, K+1) softmax of ``VLM_TEMPERATURE`` x cosine between RoI CLIP features and every class + background."""
        logits = self.vlm_temperature * F.normalize(region_features.float(), dim=-1) @ self.classifier().t()
        return logits.softmax(dim=-1)

    def inference(self, predictions: tuple[torch.Tensor, torch.Tensor], proposals: list[Instances],
                  vlm_features: Optional[torch.Tensor] = None) -> tuple[list[Instances], list[torch.Tensor]]:
        """detectron2's inference; with ``vlm_features`` ((N, D) RoI CLIP features) the scores are F-ViT-fused."""
        boxes = self.predict_boxes(predictions, proposals)
        probs = self.predict_probs(predictions, proposals)
        if vlm_features is not None:
            vlm = self.vlm_probabilities(vlm_features).split([len(p) for p in proposals], dim=0)
            probs = [fuse_scores(p, v.to(p.dtype), self.novel, self.alpha, self.beta) for p, v in zip(probs, vlm)]
        return fast_rcnn_inference(boxes, probs, [x.image_size for x in proposals], self.test_score_thresh,
                                   self.test_nms_thresh, self.test_topk_per_image)


@ROI_HEADS_REGISTRY.register()
class OpenVocabROIHeads(StandardROIHeads):
    """``StandardROIHeads`` with :class:`OpenVocabOutputLayers` and, at test time, F-ViT's VLM branch."""

    @configurable
    def __init__(self, *, vlm_branch: bool = True, clip_stride: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vlm_branch = vlm_branch
        self.clip_stride = clip_stride

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec], class_embeddings: Optional[torch.Tensor] = None,
                    background_embedding: Optional[torch.Tensor] = None, novel: Optional[Sequence[bool]] = None):
        if class_embeddings is None or background_embedding is None or novel is None:
            raise ValueError("OpenVocabROIHeads needs the class embeddings: build the model with "
                             "MODEL.META_ARCHITECTURE 'OpenVocabRCNN' (densevlm det train does)")
        ret = super().from_config(cfg, input_shape)
        o = cfg.MODEL.OV_DETECTOR
        box_shape = ret["box_head"].output_shape
        kwargs = FastRCNNOutputLayers.from_config(cfg, box_shape)
        kwargs.pop("input_shape")
        if kwargs.pop("num_classes") != len(novel):
            raise ValueError(f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but the dataset has "
                             f"{len(novel)} classes")
        ret["box_predictor"] = OpenVocabOutputLayers(
            box_shape, class_embeddings=class_embeddings, background_embedding=background_embedding, novel=novel,
            learned_temperature=o.LEARNED_TEMPERATURE, learn_background=o.LEARN_BACKGROUND,
            vlm_temperature=o.VLM_TEMPERATURE, alpha=o.ALPHA, beta=o.BETA, **kwargs)
        ret["vlm_branch"] = bool(o.VLM_BRANCH)
        if o.VLM_BRANCH and CLIP_MAP not in input_shape:
            raise ValueError(f"MODEL.OV_DETECTOR.VLM_BRANCH needs the backbone's '{CLIP_MAP}' map (MODEL.BACKBONE.NAME "
                             f"'build_densevlm_fpn_backbone'); this backbone gives {sorted(input_shape)}; or set "
                             "VLM_BRANCH False")
        ret["clip_stride"] = input_shape[CLIP_MAP].stride if CLIP_MAP in input_shape else None
        return ret

    def region_clip_features(self, clip_map: torch.Tensor, proposals: list[Instances]) -> torch.Tensor:
        """(N, D) RoIAlign-1x1 features of every proposal on the dense CLIP map (F-ViT's ``vlm_roi_extractor``).

        The map covers the padded batch tensor at ``clip_stride`` pixels per token; boxes are in that tensor's
        pixels (each image sits at its top-left corner), so they are normalised by the map's extent in pixels.
        """
        h, w = clip_map.shape[-2:]
        extent = clip_map.new_tensor([w, h, w, h]) * self.clip_stride
        return pool_boxes(clip_map, [p.proposal_boxes.tensor.to(clip_map.dtype) / extent for p in proposals])

    def _forward_box(self, features: dict[str, torch.Tensor], proposals: list[Instances]):
        if self.training or not self.vlm_branch:
            return super()._forward_box(features, proposals)
        box_features = self.box_pooler([features[f] for f in self.box_in_features],
                                       [x.proposal_boxes for x in proposals])
        predictions = self.box_predictor(self.box_head(box_features))
        del box_features
        vlm_features = self.region_clip_features(features[CLIP_MAP], proposals)
        instances, _ = self.box_predictor.inference(predictions, proposals, vlm_features=vlm_features)
        return instances


def detector_classes(cfg) -> tuple[list[str], list[bool]]:
    """The classes the detector scores (``thing_classes`` of ``DATASETS.TEST[0]``, else ``TRAIN[0]``) and their
    novel flags; a training split with other classes than the test split is an error."""
    names = [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]
    if not names:
        raise ValueError("OpenVocabRCNN: DATASETS.TEST and DATASETS.TRAIN are empty; the classes come from their "
                         "metadata (thing_classes, novel_classes)")
    metas = [MetadataCatalog.get(n) for n in names]
    classes = metas[0].get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset '{names[0]}': metadata has no thing_classes")
    for name, meta in zip(names[1:], metas[1:]):
        if list(meta.get("thing_classes", [])) != list(classes):
            raise ValueError(f"dataset '{name}' has other classes than '{names[0]}'; train and test splits must "
                             "share the class list (the training split marks novel classes, it does not drop them)")
    novel = set(metas[0].get("novel_classes", []))
    unknown = sorted(novel - set(classes))
    if unknown:
        raise ValueError(f"dataset '{names[0]}': novel_classes {unknown} are not in thing_classes")
    return list(classes), [c in novel for c in classes]


def detector_text_embeddings(cfg, backbone: nn.Module, classes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, D) class embeddings and the (D,) background embedding, in the backbone's text space."""
    from densevlm.vocab import ClassEntry, Vocabulary, build_text_embeddings, get_templates, split_synonyms
    from densevlm.vocab.cache import load_text_embeddings

    clip = getattr(getattr(backbone, "bottom_up", backbone), "clip", None)
    if clip is None:
        raise ValueError("OpenVocabRCNN needs a densevlm backbone (MODEL.BACKBONE.NAME 'build_densevlm_fpn_backbone'):"
                         " its text tower embeds the class names and its dense map feeds the VLM branch")
    o = cfg.MODEL.OV_DETECTOR
    templates = get_templates(o.TEMPLATES)
    entries = []
    for index, text in enumerate(classes):
        name, synonyms = split_synonyms(str(text))
        entries.append(ClassEntry(name=name, synonyms=synonyms, id=index))
    vocab = Vocabulary(name="detector", classes=tuple(entries))
    dim = clip.embed_dim
    if o.CLASS_EMBEDDINGS:
        emb, _ = load_text_embeddings(o.CLASS_EMBEDDINGS, vocab, renormalize=True)
        if emb.shape[1] != dim:
            raise ValueError(f"MODEL.OV_DETECTOR.CLASS_EMBEDDINGS {o.CLASS_EMBEDDINGS}: {emb.shape[1]}-d embeddings, "
                             f"but the backbone {clip.name} maps regions into a {dim}-d text space; build the "
                             "embeddings with this backbone's text tower (densevlm embed-text --model ...) or leave "
                             "CLASS_EMBEDDINGS empty")
    else:
        emb = build_text_embeddings(clip, vocab, templates, progress=False)
    background = build_text_embeddings(
        clip, Vocabulary(name="background", classes=(ClassEntry(name=BACKGROUND_PROMPT),)), templates,
        progress=False)[0]
    return emb.cpu(), background.cpu()


@META_ARCH_REGISTRY.register()
class OpenVocabRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` whose ROI heads get the class text embeddings of the backbone (see the module docs)."""

    @classmethod
    def from_config(cls, cfg):
        from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY as registry

        backbone = build_backbone(cfg)
        classes, novel = detector_classes(cfg)
        class_emb, background = detector_text_embeddings(cfg, backbone, classes)
        shapes = backbone.output_shape()
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, shapes),
            "roi_heads": registry.get(cfg.MODEL.ROI_HEADS.NAME)(
                cfg, shapes, class_embeddings=class_emb, background_embedding=background, novel=novel),
            "input_format": cfg.INPUT.FORMAT,
            "vis_period": cfg.VIS_PERIOD,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }
