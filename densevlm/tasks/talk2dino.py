"""``densevlm talk2dino cache|train``: features of both frozen encoders cached once, then ψ trained from the cache.

The cache (:mod:`densevlm.data.feature_cache`) holds, per image, the per-head attention-pooled embeddings of the
vision backbone (:mod:`densevlm.models.patch_attention`) and, per caption, the CLIP text embedding. ψ then trains
through the one :class:`~densevlm.engine.trainer.Trainer` with :class:`~densevlm.methods.talk2dino.Talk2DINOObjective`;
the run directory's ``weights.safetensors`` is ψ in the released key layout.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from densevlm.config.talk2dino import Talk2DINOTrainConfig
from densevlm.data import feature_cache as fc
from densevlm.data import stores
from densevlm.engine.run_dir import check_run_dir, run_directory
from densevlm.engine.trainer import FitResult, Trainer
from densevlm.methods.talk2dino import Talk2DINOObjective, Talk2DINOProjection, encode_captions
from densevlm.models.patch_attention import PatchBackbone, attention_pool, create_patch_backbone
from densevlm.utils.device import resolve_device
from densevlm.utils.hashing import sha256_file

log = logging.getLogger(__name__)


def text_identity(model: Any) -> dict[str, Any]:
    return {"name": model.name, "weights_id": model.weights_id, "embed_dim": int(model.embed_dim)}


def cache_identity(cfg: Talk2DINOTrainConfig, backbone: PatchBackbone, text_model: Any) -> dict[str, Any]:
    """What the cache's features depend on (see :mod:`densevlm.data.feature_cache`)."""
    if not cfg.data.captions_json or not cfg.data.image_root:
        from densevlm.config.core import ConfigError

        raise ConfigError("data.captions_json and data.image_root: required (a COCO captions json and the folder "
                          "its file_name entries are in); set them in the recipe or with --set")
    captions = Path(cfg.data.captions_json)
    if not captions.is_file():
        raise FileNotFoundError(f"data.captions_json: captions json not found: {captions}")
    return {"vision": backbone.identity(), "text": text_identity(text_model),
            "data": {"captions_file": captions.name, "captions_sha256": sha256_file(captions),
                     "image_size": cfg.data.image_size, "max_images": cfg.data.max_images},
            "dtype": cfg.cache.dtype}


def cache_dir_of(cfg: Talk2DINOTrainConfig) -> Path:
    """``cache.dir``, or ``<output_dir>.cache`` beside the run directory (a run directory starts empty)."""
    out = Path(cfg.output_dir)
    return Path(cfg.cache.dir) if cfg.cache.dir else out.with_name(out.name + ".cache")


@torch.no_grad()
def build_feature_cache(cfg: Talk2DINOTrainConfig, backbone: PatchBackbone, text_model: Any, *,
                        progress: bool = True) -> Path:
    """Write (or reuse, or resume) the cache of ``cfg``; returns its folder.

    A complete cache with this run's identity is reused; one with another identity is refused unless
    ``cache.rebuild``; shards of an interrupted build with this identity are kept.
    """
    cache_dir = cache_dir_of(cfg)
    identity = cache_identity(cfg, backbone, text_model)
    manifest = fc.read_manifest(cache_dir)
    if manifest is not None and cfg.cache.rebuild:
        for path in [cache_dir / fc.MANIFEST, cache_dir / fc.TEXT_FILE, *cache_dir.glob("images-*.safetensors")]:
            path.unlink(missing_ok=True)
        manifest = None
    if manifest is not None:
        fc.check_identity(cache_dir, manifest, identity)
        log.info("feature cache %s: reusing (%d images, %d captions)", cache_dir, manifest["num_images"],
                 manifest["num_captions"])
        return cache_dir
    pairs = fc.read_caption_pairs(cfg.data.captions_json, cfg.data.image_root, cfg.data.max_images)
    sha = fc.identity_sha(identity)
    dtype = getattr(torch, cfg.cache.dtype)
    device = next(backbone.parameters()).device
    n, size = len(pairs.images), cfg.cache.shard_size
    starts = list(range(0, n, size))
    counts = [min(size, n - start) for start in starts]
    shards = [{"file": fc.shard_name(s), "start": start, "count": count}
              for s, (start, count) in enumerate(zip(starts, counts))]
    path_of = lambda s: cache_dir / fc.shard_name(s)  # noqa: E731
    todo, kept = stores.plan_shards(range(len(starts)), path_of=path_of,
                                    is_done=lambda s, path: fc.shard_is_done(path, sha, starts[s], counts[s]))
    with tqdm(total=n, initial=sum(counts[s] for s in kept), desc="image features", unit="img",
              disable=not progress) as bar:

        def compute(s: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            data = fc.CenterCropImages(pairs.images[starts[s]:starts[s] + counts[s]], cfg.data.image_size,
                                       backbone.image_mean, backbone.image_std)
            loader = DataLoader(data, batch_size=cfg.cache.batch_size, num_workers=cfg.cache.num_workers)
            heads, avg = [], []
            for images in loader:
                h, a = attention_pool(backbone(images.to(device)))
                heads.append(h.to("cpu", dtype))
                avg.append(a.to("cpu", dtype))
                bar.update(images.shape[0])
            return fc.shard_tensors(torch.cat(heads), torch.cat(avg), sha, starts[s])

        stores.write_shards(todo, path_of=path_of, compute=compute)
    text = encode_captions(text_model, pairs.captions, progress=progress)
    fc.write_text(cache_dir, text, torch.tensor(pairs.image_index), sha)
    fc.write_manifest(cache_dir, identity, shards, num_images=n, num_captions=len(pairs.captions),
                      heads=backbone.num_heads, dim=backbone.embed_dim, text_dim=int(text.shape[1]))
    return cache_dir


def build_encoders(cfg: Talk2DINOTrainConfig) -> tuple[PatchBackbone, Any]:
    """The frozen vision backbone and the CLIP text model of ``cfg``, on ``cfg.cache.device``."""
    from densevlm.models import create_backbone

    device = resolve_device(cfg.cache.device)
    backbone = create_patch_backbone(cfg.vision, device=device)
    text_model = create_backbone(cfg.text, device=device).requires_grad_(False)
    return backbone, text_model


def run_talk2dino_cache(cfg: Talk2DINOTrainConfig, *, progress: bool = True) -> tuple[Path, float]:
    """Build (or check) the feature cache of ``cfg``; returns (folder, seconds)."""
    t0 = time.time()
    backbone, text_model = build_encoders(cfg)
    return build_feature_cache(cfg, backbone, text_model, progress=progress), time.time() - t0


def run_talk2dino_train(cfg: Talk2DINOTrainConfig, *, resume: bool = False, overwrite: bool = False,
                        stop_after_epoch: Optional[int] = None, progress: bool = True) -> FitResult:
    """Cache the features when needed, then train ψ; writes a run directory (ψ in the released key layout)."""
    from accelerate import PartialState

    check_run_dir(cfg.output_dir, cfg, resume=resume, overwrite=overwrite)  # a refusal comes first
    state = PartialState(cpu=cfg.loop.cpu)
    t0 = time.time()
    cache_dir: Optional[Path] = None
    if state.is_main_process:  # one process extracts; the others read the finished cache
        cache_dir, _ = run_talk2dino_cache(cfg, progress=progress)
    state.wait_for_everyone()
    cache_dir = cache_dir or cache_dir_of(cfg)
    cache_seconds = time.time() - t0
    # The cache checked its identity while building; here the manifest must still be the one just checked.
    cache = fc.load_feature_cache(cache_dir)
    torch.manual_seed(cfg.loop.seed)  # ψ's initialisation is part of the recipe
    psi = Talk2DINOProjection(int(cache.text.shape[1]), int(cache.heads.shape[-1]))
    with run_directory(cfg.output_dir, cfg, cpu=cfg.loop.cpu, resume=resume, overwrite=overwrite) as run_dir:
        trainer = Trainer(model=psi, objective=Talk2DINOObjective(cfg.temperature),
                          dataset=fc.CachedCaptionPairs(cache), loop=cfg.loop, optim=cfg.optim, run_dir=run_dir,
                          export_state=lambda m: m.state_dict())
        result = trainer.fit(resume=resume, stop_after_epoch=stop_after_epoch)
    result.metrics["cache_seconds"] = round(cache_seconds, 2)
    result.metrics["cache_dir"] = str(cache_dir)
    if state.is_main_process and stop_after_epoch is None:
        from densevlm.engine.run_dir import METRICS_FILE
        from densevlm.utils.io import atomic_write_json

        atomic_write_json(run_dir / METRICS_FILE, result.metrics)
    return result
