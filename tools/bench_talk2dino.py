#!/usr/bin/env python
"""Benchmark Talk2DINO's three costs and print one JSON object (warm-up excluded, random weights):

* ``extract``: feature extraction for the cache (the backbone forward at the recipe's resolution, the last block's
  CLS->patch attention and the per-head attention pooling), images/s: DINOv2 ViT-B/14-reg at 448 px and the demo's
  toy-student at 192 px;
* ``train``: ψ optimisation steps/s (batch 128, best-head InfoNCE, Adam) on a synthetic cache of the ViT-B shape
  (12 heads x 768, 512-d text);
* ``segment``: the Talk2DINO segmenter on 448x448 windows (150 classes), windows/s, with and without PAMR.

    python tools/bench_talk2dino.py --threads 2
    python tools/bench_talk2dino.py --device cuda --images 64
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

import torch


def _rate(fn: Callable[[], Any], items: int, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return items * repeats / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--images", type=int, default=2, help="images per extraction batch")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from densevlm.config.talk2dino import Talk2DINOVisionConfig
    from densevlm.engine.step_module import StepModule
    from densevlm.methods.talk2dino import Talk2DINOObjective, Talk2DINOProjection
    from densevlm.models.patch_attention import attention_pool, create_patch_backbone
    from densevlm.segmenters.talk2dino import Talk2DINOSegmenter

    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(),
                           "load_avg": os.getloadavg()[0], "torch": torch.__version__}
    dinov2 = create_patch_backbone(Talk2DINOVisionConfig(family="dinov2", name="vit_base_patch14_reg4_dinov2"),
                                   device=device)
    toy = create_patch_backbone(Talk2DINOVisionConfig(family="clip", name="toy-student"), device=device)
    extract = {}
    for name, backbone, size in (("dinov2_vitb14_reg_448", dinov2, 448), ("toy_student_192", toy, 192)):
        x = torch.randn(args.images, 3, size, size, device=device)
        with torch.no_grad():
            extract[name] = round(_rate(lambda: attention_pool(backbone(x)), args.images, args.repeats, device), 2)
    out["extract_images_per_s"] = extract

    psi = Talk2DINOProjection(512, 768).to(device)
    opt = torch.optim.Adam(psi.parameters(), lr=1e-4)
    objective, step_model = Talk2DINOObjective(), StepModule(psi)
    batch = {"text": torch.randn(128, 512, device=device), "heads": torch.randn(128, 12, 768, device=device)}

    def step() -> None:
        loss = objective(step_model, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    out["train_steps_per_s"] = round(_rate(step, 1, 20 * args.repeats, device), 2)

    segment = {}
    x = torch.randn(1, 3, 448, 448, device=device)
    for pamr in (False, True):
        seg = Talk2DINOSegmenter(dinov2, psi.cpu(), torch.randn(150, 512), [f"c{i}" for i in range(150)],
                                 pamr=pamr)
        segment["pamr" if pamr else "plain"] = round(_rate(lambda: seg(x), 1, args.repeats, device), 3)
    out["segment_windows_per_s"] = segment
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
