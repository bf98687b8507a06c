"""The gradio page of ``densevlm app`` (the field's convention for model demos, as Talk2DINO's) and its server.

The page lays out what :mod:`densevlm.app.explorer` computes: pick models, upload or choose an image, type class
names; the dense segmentation of every model side by side, the probability map of one class, and the teacher's
proposed labels for the image's regions from a chosen region source (grid split, the example world's segments,
a boxes or masks file). It binds the loopback address only; one request runs at a time and a
request is refused once it has run ``request_timeout`` seconds.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from densevlm.app.explorer import (GRID_SPLITS, Explorer, labels_overlay, legend_html, parse_classes,
                                   probability_image, segmentation_panels, side_by_side, world_examples)
from densevlm.config.report import AppConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.toyworld import generate_world
from densevlm.vocab.registry import get_vocabulary
from densevlm.vocab.vocabulary import Vocabulary

# No usage statistics leave this machine (gradio reads this when it is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402

log = logging.getLogger(__name__)

TITLE = "densevlm explorer"
CSS = "body, button, input, textarea {font-family: sans-serif !important} .legend {font-size: 13px}"


def prepare_world(cfg: AppConfig) -> Path:
    """The toy world whose val images are the examples: ``cfg.world``, or a small one made under ``output_dir``
    on first start (the val split only: the examples)."""
    if cfg.world:
        root = Path(cfg.world)
        if not (root / "world.json").is_file():
            raise FileNotFoundError(f"world: {root} is not a toy world (no world.json); `densevlm toyworld --out DIR` "
                                    "makes one")
        return root
    root = Path(cfg.output_dir) / "toyworld"
    if not (root / "world.json").is_file():
        world = ToyWorldConfig(num_train=0, num_val=max(1, cfg.examples), workers=0)
        generate_world(world, root, overwrite=True, progress=False)
    return root


class Handlers:
    """The page's callbacks over one :class:`Explorer`; errors reach the page as messages (``gr.Error``)."""

    def __init__(self, explorer: Explorer, timeout: float) -> None:
        self.explorer, self.timeout = explorer, timeout

    def _vocabulary(self, text: str) -> Vocabulary:
        try:
            return parse_classes(text or "", self.explorer.known)
        except ValueError as err:
            raise gr.Error(str(err)) from None

    def _check_time(self, t0: float, what: str) -> None:
        if time.time() - t0 > self.timeout:
            raise gr.Error(f"the request ran longer than request_timeout ({self.timeout:.0f}s) at {what}; try fewer "
                           "models or a smaller image")

    def segment(self, image: Optional[np.ndarray], labels: Sequence[str], classes: str,
                prob_class: str) -> tuple[np.ndarray, str, np.ndarray, str]:
        if image is None:
            raise gr.Error("upload an image or choose an example first")
        labels = [m for m in (labels or []) if m in self.explorer.labels]
        if not labels:
            raise gr.Error(f"pick at least one model of {self.explorer.labels}")
        vocabulary = self._vocabulary(classes)
        names = vocabulary.names
        target = names.index(prob_class.strip()) if prob_class and prob_class.strip() in names else 0
        t0 = time.time()
        with self.explorer.lock:
            segmentations = []
            for label in labels:
                self._check_time(t0, f"model {label}")
                segmentations.append(self.explorer.segment(label, image[..., :3], vocabulary))
        panels = segmentation_panels(segmentations, len(vocabulary))
        probs = side_by_side([probability_image(s.probs[target]) for s in segmentations])
        status = (f"{' | '.join(labels)} (left to right) on a {image.shape[1]}x{image.shape[0]} image, "
                  f"{len(names)} classes, {time.time() - t0:.1f}s; probability map of **{names[target]}**")
        return panels, legend_html(vocabulary), probs, status

    def propose(self, image: Optional[np.ndarray], classes: str, source: str, split: Any,
                image_name: str) -> tuple[np.ndarray, list[list[Any]], str]:
        if image is None:
            raise gr.Error("upload an image or choose an example first")
        vocabulary = self._vocabulary(classes)
        choices = self.explorer.region_choices()
        if source not in choices:
            raise gr.Error(f"region source: pick one of {list(choices)}, got {source!r}")
        try:
            with self.explorer.lock:
                regions, what = self.explorer.regions(choices[source], image[..., :3], split=int(split),
                                                      image_name=image_name or "")
                rows = self.explorer.region_labels(image[..., :3], vocabulary, regions)
        except (ValueError, FileNotFoundError) as err:  # a region file that does not fit the image: say so
            raise gr.Error(str(err)) from None
        table = [[i, str(r["id"]), ", ".join(f"{n} {p:.2f}" for n, p in r["labels"]), r["route"],
                  "yes" if r["passes"] else "no", str(r["box"])] for i, r in enumerate(rows)]
        passing = sum(r["passes"] for r in rows)
        status = f"{what}: {len(rows)} regions, {passing} pass the threshold ({self.explorer.cfg.threshold})"
        return labels_overlay(image[..., :3], rows, len(vocabulary)), table, status


def build_app(explorer: Explorer, examples: Sequence[str], default_classes: str) -> gr.Blocks:
    """The page (not launched)."""
    h = Handlers(explorer, explorer.cfg.request_timeout)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nDense open-vocabulary segmentation by the models below (zoo names, run directories, "
                    "exports): pick models, upload or choose an image, type class names, press **Segment**.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="numpy", image_mode="RGB", sources=["upload"],
                                 elem_id="input-image", format="png")
                # The image's file name: region files name their images so (an example fills it in).
                image_name = gr.Textbox(value="", label="image file name (to find its regions in a region file)",
                                        elem_id="image-name")
                if examples:
                    gr.Examples(examples=[[e, Path(e).name] for e in examples], inputs=[image, image_name],
                                label="toy-world examples")
            with gr.Column():
                models = gr.Dropdown(choices=explorer.labels, value=explorer.labels, multiselect=True, label="models",
                                     elem_id="models")
                classes = gr.Textbox(value=default_classes, lines=3, elem_id="classes",
                                     label="classes (comma-separated; 'name (stuff)' marks a background class)")
                prob_class = gr.Textbox(value="", elem_id="prob-class",
                                        label="class of the probability map (empty: the first class)")
                run = gr.Button("Segment", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
        segmentation = gr.Image(label="dense segmentation, models side by side", format="png", interactive=False,
                                elem_id="segmentation")
        legend = gr.HTML(elem_id="legend")
        probability = gr.Image(label="probability of one class (softmax of cos / 0.01; bright = 1)", format="png",
                               interactive=False, elem_id="probability")
        with gr.Accordion(f"the teacher's proposed labels ({explorer.cfg.teacher})", open=False):
            gr.Markdown("Regions from a region source: the grid at a split, the example world's panoptic segments, or "
                        "the region file of `regions` (boxes or masks, matched to the image by its file name). Each "
                        "region's top-3 classes with probabilities (as `densevlm labels propose` computes them), the "
                        "thing/stuff route of the best one and whether it passes DenseVLM's confidence threshold "
                        f"({explorer.cfg.threshold}); faint: it does not.")
            region_choices = list(explorer.region_choices())
            with gr.Row():
                source = gr.Dropdown(choices=region_choices, value=region_choices[0], label="region source",
                                     elem_id="region-source")
                split = gr.Dropdown(choices=list(GRID_SPLITS), value=explorer.cfg.grid if explorer.cfg.grid in
                                    GRID_SPLITS else GRID_SPLITS[1], label="grid split (cells per side)",
                                    elem_id="grid-split")
            propose = gr.Button("Propose labels", elem_id="propose")
            region_status = gr.Markdown(elem_id="teacher-status")
            overlay = gr.Image(label="regions coloured by the teacher's label", format="png", interactive=False,
                               elem_id="teacher-overlay")
            table = gr.Dataframe(headers=["region", "id", "top-3 (probability)", "route", "passes",
                                          "box (x0, y0, x1, y1)"], elem_id="teacher-table", interactive=False)
        run.click(h.segment, inputs=[image, models, classes, prob_class],
                  outputs=[segmentation, legend, probability, status], concurrency_limit=1)
        propose.click(h.propose, inputs=[image, classes, source, split, image_name],
                      outputs=[overlay, table, region_status], concurrency_limit=1)
        image.upload(lambda: "", outputs=[image_name])  # an uploaded image is no longer the example named
    return app


def serve(cfg: AppConfig) -> None:
    """Build the explorer over ``cfg`` and serve its page on ``cfg.host``:``cfg.port`` until interrupted."""
    explorer = Explorer(cfg)
    for label in explorer.labels:  # load now: a bad model name fails at start (before the example world is made)
        explorer.model(label)
    world = prepare_world(cfg)
    known = get_vocabulary(str(world))
    explorer.known = known
    explorer.world = world
    default_classes = cfg.classes or ", ".join(known.names)
    app = build_app(explorer, world_examples(world, cfg.examples), default_classes)
    app.queue(default_concurrency_limit=1, max_size=16)
    print(f"densevlm app: models {explorer.labels}, examples from {world}", flush=True)
    app.launch(server_name=cfg.host, server_port=cfg.port or None, ssr_mode=False, show_error=True,
               theme=gr.themes.Default(font=["sans-serif"], font_mono=["monospace"]), css=CSS)
