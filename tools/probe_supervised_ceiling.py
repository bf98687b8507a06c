#!/usr/bin/env python
"""How much can the toy CLIP's image tower learn about things at a given compute? A supervised ceiling.

Image-text pre-training only ever sees captions; the zero-shot check asks the image embedding for the largest
thing. This probe removes the captions from the question: it trains the same image tower (same architecture,
same random initialisation, same input size, same optimiser family) with a linear head on the *label* of the
largest thing, for the same number of steps and batch size as a pre-training recipe, and reports val top-1.
When even this direct supervision stays far below a zero-shot bar, no choice of captions, prompts or loss can
reach it at that compute: the tower needs more images seen (or a different architecture), not a better signal.

Two reference points come with it: chance (1 / number of thing classes) and the *context-only* predictor,
which names the thing most often seen on the image's largest stuff in train (what a model that sees only
the background gets).

Images are decoded once and held in memory (uint8 at the training size), so the steps measure the model,
not JPEG decoding. Prints one JSON object.

    python tools/probe_supervised_ceiling.py --world runs/demo/toyworld --steps 1000 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from densevlm.config.train import OptimConfig  # noqa: E402
from densevlm.data.images import load_rgb  # noqa: E402
from densevlm.engine.optim import build_optimizer, build_scheduler  # noqa: E402
from densevlm.evaluation.zero_shot import largest_segments  # noqa: E402
from densevlm.models import ModelSpec, create_backbone  # noqa: E402
from densevlm.vocab import get_vocabulary  # noqa: E402


def load_split(world: Path, split: str, vocab: Any, size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """uint8 images N×3×size×size, the largest thing's index among thing classes, and the largest stuff's."""
    index = {c.id: i for i, c in enumerate(vocab.classes)}
    isthing = {c.id: c.isthing for c in vocab.classes}
    thing_pos = {i: k for k, i in enumerate(i for i, c in enumerate(vocab.classes) if c.isthing)}
    items = [it for it in largest_segments(world / "annotations" / f"panoptic_{split}.json", index, isthing)
             if it.thing is not None]
    if not items:
        raise ValueError(f"{world}: the {split} split has no image with a thing")
    images = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for n, it in enumerate(tqdm(items, desc=f"decode {split}", leave=False)):
        img = load_rgb(world / "images" / split / it.file_name)
        images[n] = np.asarray(img.resize((size, size), resample=Image.BICUBIC))  # as the zero-shot check resizes
    labels = torch.tensor([thing_pos[it.thing] for it in items])
    stuff = [it.stuff if it.stuff is not None else -1 for it in items]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, stuff


def context_only_top1(train_stuff: list[int], train_y: torch.Tensor, val_stuff: list[int], val_y: torch.Tensor) -> float:
    """Predict, for each val image, the thing seen most often on its largest stuff in train."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for s, y in zip(train_stuff, train_y.tolist()):
        counts[s][y] += 1
    overall = Counter(train_y.tolist()).most_common(1)[0][0]
    pred = [counts[s].most_common(1)[0][0] if counts[s] else overall for s in val_stuff]
    return float((torch.tensor(pred) == val_y).float().mean() * 100)


class Probe(nn.Module):
    """The CLIP's image embedding (as zero-shot uses it: ``encode_image``) followed by a linear classifier."""

    def __init__(self, model: Any, num_classes: int) -> None:
        super().__init__()
        self.visual = model.clip.visual
        self.encode = model.encode_image
        self.head = nn.Linear(model.embed_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, required=True, help="toy-world root (or any folder with annotations/"
                    "panoptic_{train,val}.json and images/{train,val}/)")
    ap.add_argument("--model", default="ToyCLIP-ViT-T-16", help="model config name (random initialisation)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=0, help="0 = the model's native size")
    ap.add_argument("--eval-every", type=int, default=0, help="also report val top-1 every N steps (0 = end only)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    vocab = get_vocabulary(args.world)
    model = create_backbone(ModelSpec(name=args.model))
    size = args.image_size or model.native_image_size
    t0 = time.perf_counter()
    x_train, y_train, s_train = load_split(args.world, "train", vocab, size)
    x_val, y_val, s_val = load_split(args.world, "val", vocab, size)
    decode_s = time.perf_counter() - t0
    num_classes = sum(c.isthing for c in vocab.classes)

    probe = Probe(model, num_classes).train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in probe.parameters():  # the image tower and the head; the text tower is not part of the question
        p.requires_grad_(True)
    optim_cfg = OptimConfig(lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, warmup_steps=args.warmup_steps)
    optimizer = build_optimizer(probe, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, args.steps)
    mean = torch.tensor(model.image_mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.image_std).view(1, 3, 1, 1) * 255

    def normalise(images: torch.Tensor) -> torch.Tensor:
        """uint8 batch (kept as uint8 in memory: a quarter of float32) -> the model's normalised input."""
        return (images.float() - mean) / std

    gen = torch.Generator().manual_seed(args.seed)

    def evaluate() -> float:
        probe.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x_val), 128):
                logits = probe(normalise(x_val[i:i + 128]))
                correct += int((logits.argmax(1) == y_val[i:i + 128]).sum())
        probe.train()
        return correct / len(x_val) * 100

    curve: list[dict[str, float]] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in tqdm(range(args.steps), desc="supervised probe"):
        idx = torch.randint(len(x_train), (args.batch_size,), generator=gen)
        x = normalise(x_train[idx])
        flip = torch.rand(args.batch_size, 1, 1, 1, generator=gen) < 0.5  # the pre-training's only free augmentation
        x = torch.where(flip, x.flip(3), x)
        loss = F.cross_entropy(probe(x), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            curve.append({"step": step + 1, "val_top1": round(evaluate(), 2)})
    train_s = time.perf_counter() - t0
    final = evaluate()
    curve.append({"step": args.steps, "val_top1": round(final, 2)})
    tail = losses[-max(1, args.steps // 10):]
    print(json.dumps({
        "probe": "supervised largest-thing classification with the CLIP image tower + linear head",
        "model": args.model,
        "image_size": size,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "images_seen": args.steps * args.batch_size,
        "lr": args.lr,
        "train_images": len(x_train),
        "val_images": len(x_val),
        "thing_classes": num_classes,
        "val_top1_largest_thing": round(final, 2),
        "curve": curve,
        "final_train_loss_mean_last_10pct": round(float(np.mean(tail)), 4),
        "chance_top1": round(100 / num_classes, 2),
        "context_only_top1": round(context_only_top1(s_train, y_train, s_val, y_val), 2),
        "train_seconds": round(train_s, 1),
        "decode_seconds": round(decode_s, 1),
        "images_per_second": round(args.steps * args.batch_size / train_s, 1),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
