"""``densevlm demo talk2dino``: Talk2DINO on the toy world, timed, beside the dense-CLIP segmenter.

1. the toy world (the demo's own, reused);
2. Talk2DINO's ψ trained on the toy train captions: features of the frozen backbone (a zoo toy CLIP's visual tower;
   the toy world has no DINOv2, the method's intended backbone) and of its text tower cached once, then ψ trained
   from the cache through the one training loop;
3. toy-val segmentation of the same backbone by the dense-CLIP segmenter and by Talk2DINO, with the demo's
   segmentation settings, plus the main demo's dense-CLIP rows when it has run; the table, timings and a summary
   (``talk2dino/summary.json``).

Each part is reused on a re-run when its config (and ψ) is unchanged.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from densevlm.config import to_dict
from densevlm.config.demo import DemoConfig
from densevlm.config.model import ModelSpec
from densevlm.config.semseg import SemSegEvalConfig, toyworld_data
from densevlm.config.talk2dino import (
    FeatureCacheConfig,
    Talk2DINOCaptionsConfig,
    Talk2DINOSegmenterConfig,
    Talk2DINOTrainConfig,
    Talk2DINOVisionConfig,
)
from densevlm.config.vocab import TextEmbeddingConfig
from densevlm.utils.io import atomic_write_json, read_json


def _backbone_spec(backbone: str) -> dict[str, Any]:
    """A zoo name or an open_clip name -> ``name``; a run directory -> ``pretrained``."""
    return {"name": "", "pretrained": backbone} if Path(backbone).is_dir() else {"name": backbone, "pretrained": None}


def talk2dino_train_config(cfg: DemoConfig, world: Path) -> Talk2DINOTrainConfig:
    t = cfg.talk2dino
    out = Path(cfg.output_dir)
    spec = _backbone_spec(t.backbone)
    return Talk2DINOTrainConfig(
        output_dir=str(out / "talk2dino" / "psi"),
        vision=Talk2DINOVisionConfig(family="clip", last_block=t.last_block, **spec),
        text=ModelSpec(**spec),
        data=Talk2DINOCaptionsConfig(captions_json=str(world / "annotations" / "captions_train.json"),
                                     image_root=str(world / "images" / "train"), image_size=cfg.world.image_size,
                                     max_images=t.max_images),
        cache=FeatureCacheConfig(dir=str(out / "talk2dino" / "cache"), batch_size=64, dtype="float32",
                                 num_workers=2, device="cpu"),
        temperature=t.temperature, loop=copy.deepcopy(t.loop), optim=copy.deepcopy(t.optim),
    )


def talk2dino_eval_configs(cfg: DemoConfig, world: Path, psi_run: Path) -> dict[str, SemSegEvalConfig]:
    """Dense CLIP and Talk2DINO on the same backbone, with the demo's segmentation settings."""
    from densevlm.tasks.demo import eval_vocabulary

    t = cfg.talk2dino
    spec = ModelSpec(**_backbone_spec(t.backbone))
    out = Path(cfg.output_dir) / "talk2dino" / "semseg"
    configs = {}
    for label, segmenter in ((f"dense CLIP ({t.backbone})", "dense_clip"), (f"Talk2DINO ({t.backbone})", "talk2dino")):
        configs[label] = SemSegEvalConfig(
            output_dir=str(out / segmenter), model=copy.deepcopy(spec), segmenter=segmenter,
            talk2dino=Talk2DINOSegmenterConfig(psi=str(psi_run), bg_clean=t.bg_clean),
            data=toyworld_data(world, "val", max_images=cfg.semseg.max_images),
            text=TextEmbeddingConfig(vocabulary=eval_vocabulary(cfg, world), templates=cfg.semseg.templates),
            inference=copy.deepcopy(cfg.semseg.inference), num_workers=2, device="cpu", metrics_backend="densevlm",
            figures=cfg.semseg.figures)
    return configs


def run_talk2dino_demo(cfg: DemoConfig, *, fresh: bool = False) -> dict[str, Any]:
    from densevlm.tasks.demo import train_stage, world_stage
    from densevlm.tasks.talk2dino import run_talk2dino_train
    from densevlm.evaluation.semseg import RESULT_FILE, evaluate_semseg, format_table
    from densevlm.utils.hashing import sha256_file

    t0 = time.time()
    world = world_stage(cfg, fresh)
    tcfg = talk2dino_train_config(cfg, world)
    t1 = time.time()
    train = train_stage("[T2] Talk2DINO ψ (cache + training)", tcfg, run_talk2dino_train, fresh)
    train_seconds = time.time() - t1
    psi_run = Path(tcfg.output_dir)
    psi_sha = sha256_file(psi_run / "weights.safetensors")
    results: dict[str, Any] = {}
    eval_seconds: dict[str, float] = {}
    for label, ecfg in talk2dino_eval_configs(cfg, world, psi_run).items():
        saved = Path(ecfg.output_dir) / RESULT_FILE
        stamp = Path(ecfg.output_dir) / "psi.json"
        if (not fresh and saved.is_file() and stamp.is_file() and read_json(saved).get("config") == to_dict(ecfg)
                and read_json(stamp).get("sha256") == psi_sha):
            results[label] = read_json(saved)
        else:
            results[label] = evaluate_semseg(None, ecfg, progress=True)
            atomic_write_json(stamp, {"sha256": psi_sha})
        eval_seconds[label] = round(results[label]["timing"]["seconds"], 1)
    for name in ("base", "densevlm"):  # the main demo's rows, when it has run
        saved = Path(cfg.output_dir) / "semseg" / name / RESULT_FILE
        if saved.is_file():
            results[f"dense CLIP ({name}, demo)"] = read_json(saved)
    summary = {
        "backbone": cfg.talk2dino.backbone,
        "semseg": {label: {k: r["metrics"].get(k) for k in ("mIoU", "mIoU.seen", "mIoU.novel", "fwIoU", "mACC",
                                                              "pACC")} for label, r in results.items()},
        "psi": {"run_dir": str(psi_run), "sha256": psi_sha, "steps": train.get("global_step"),
                "train_seconds": train.get("train_seconds"), "cache_seconds": train.get("cache_seconds"),
                "images": cfg.talk2dino.max_images, **train["history"][-1].get("train", {})},
        "seconds": {"psi_stage": round(train_seconds, 1), "eval": eval_seconds, "total": round(time.time() - t0, 1)},
    }
    atomic_write_json(Path(cfg.output_dir) / "talk2dino" / "summary.json", summary)
    print("\n[T3] " + format_table(results, title="semantic segmentation on toy val (%; Talk2DINO vs dense CLIP on the "
                                   "same frozen backbone; every pixel classified among all classes)"))
    p = summary["psi"]
    print(f"\nψ: {p['steps']} steps in {p['train_seconds']}s after caching {p['images'] or 'all'} train images "
          f"({p['cache_seconds']}s); stage {summary['seconds']['psi_stage']}s, evaluation "
          f"{sum(eval_seconds.values()):.0f}s; Talk2DINO demo finished in {summary['seconds']['total']:.0f}s")
    return summary
