#!/usr/bin/env python
"""Time one training step of the *reference* DenseVLM implementation.

What is timed
-------------
The official code of DenseVLM (GitHub ``HVision-NKU/DenseVLM``, snapshot at commit
``8ca50f7138fcd94e626fa9a845e0da88d146627d``, the first commit that ships ``src/``) is
expected unpacked under ``--ref-dir`` (default ``.ref/DenseVLM``, git-ignored).  Get it with
the session's ``fetch`` tool (``github:HVision-NKU/DenseVLM``) and
``git archive`` of its HEAD without ``assets/`` and ``metadata/`` plus ``git show`` of the two
316-class ``metadata/*.npy`` files it needs (the exact commands are printed when ``--ref-dir``
is missing), or with ``git clone https://github.com/HVision-NKU/DenseVLM .ref/DenseVLM``.
Nothing of it is copied here: this script only puts ``<ref-dir>/src`` first on ``sys.path`` and imports it.

The recipe is ``scripts/train_densevlm_coco_image_patches_eva_vitb16.sh``: student
EVA02-CLIP-B-16 (all 12 blocks unlocked), frozen P-VLM teacher EVA02-CLIP-L-14-336,
``--det-image-size 512``, AdamW lr 1e-5 / wd 0.1, cosine schedule with 1000 warm-up
steps, ``--precision amp``.  Reference functions that run:

* ``training.params.parse_args`` on the recipe's own flags (so every default, e.g. the
  AdamW betas/eps from ``get_default_params``, comes from the reference);
* ``training.distributed.init_distributed_device`` (single process);
* ``open_clip.create_model_and_transforms`` (student, with ``--pretrained eva``),
  ``open_clip.create_model('EVA02-CLIP-L-14-336', 'eva', ...)`` (teacher), exactly as
  ``training/main.py`` calls them, and ``CustomCLIP.lock_image_tower``;
* ``training.densevlm.DenseVLM`` (the loss, with the shipped 316-class ``.npy`` text
  embeddings) and ``training.scheduler.cosine_lr``;
* ``training.data.get_data`` -> ``GridDistillDataset`` + its ``DataLoader`` on a tiny
  synthetic COCO-format json with random JPEGs, so each batch is exactly what the recipe's
  loader yields: ``(images [B,3,S,S], boxes [B,36,5], image_crops [B,36,3,224,224])`` with the
  random 2..6 grid boxes drawn by the reference (without pycocotools the same dataset class
  is built by hand and its own ``__getitem__`` is used);
* ``training.train.train_one_epoch`` itself, fed the pre-made batches: scheduler, zero_grad,
  the reference's autocast (``training.precision.get_autocast``), ``DenseVLM.__call__``
  (teacher ``encode_pseudo_boxes`` under no_grad, student ``encode_pseudo_boxes``, the 0.3
  confidence filter, the thing/stuff KL), GradScaler backward/step/update, logit-scale clamp.

Re-implemented here (``training/main.py`` cannot be imported without its data and
checkpoints): the AdamW parameter grouping (no weight decay on gains/biases/logit_scale)
and ``GradScaler()`` when ``--precision amp``, both as ``main.py`` does them.

What differs from a real run
----------------------------
* Random-init weights: ``--pretrained eva`` is kept but ``--cache-dir`` is dropped, so neither
  the EVA02-B/16 checkpoint nor the CLIPSelf-tuned L/14 teacher is loaded.  With random
  towers few or no regions pass the teacher's 0.3 confidence filter (``kl_regions_per_step``).
  With none, the reference's KL is a batch-mean over 0 rows, i.e. NaN (reported as null), and
  all gradients are finite zeros, so GradScaler/AdamW still step; the towers' forward and
  backward run on the full dense maps either way, only the tiny 316-way KL shrinks.
* Synthetic images (random noise JPEGs at COCO-like sizes) and no data-loader time: batches are
  made before timing, as a DataLoader with workers would have them ready.
* No xformers: the EVA configs set ``xattn: true`` and the reference has no automatic
  fallback (``xops`` would be ``None``), so the vision configs are rewritten with
  ``xattn: false``, which selects the reference's own plain ``q @ k^T -> softmax -> @ v``
  branch of ``eva_vit_model.Attention``.  apex is absent too, so ``FusedLayerNorm`` is the
  reference's ``LayerNorm`` fallback.  Both are reported in the JSON.
* ``panopticapi`` (not on PyPI; only used by the panoptic *eval* datasets) is replaced by an
  empty stub module when missing; ``ftfy``, ``six`` and ``pycocotools`` likewise if they cannot
  be imported (import-only for this step; without pycocotools the dataset object is built by
  hand).  Stubs used are listed in the JSON (``stubbed_modules``).
* Single process (the recipe runs 4 ranks without gradient all-reduce, so per-rank work is
  the same).  ``--depth N`` shrinks both towers to N blocks for quick CPU dry runs.

Output: one JSON object on stdout (everything the reference prints goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

RECIPE = "scripts/train_densevlm_coco_image_patches_eva_vitb16.sh"
STUDENT = "EVA02-CLIP-B-16"
TEACHER = "EVA02-CLIP-L-14-336"  # hard-coded in training/main.py
UVLM_EMBED = "metadata/COCO_STUFF_ADE20k_Thing204_STUFF112_clip_hand_craft_EVACLIP_ViTB16.npy"
PVLM_EMBED = "metadata/COCO_STUFF_ADE20k_Thing204_STUFF112_clip_hand_craft_EVACLIP_ViTL14x336.npy"
COCO_TRAIN_IMAGES = 118287  # COCO train2017, for the scheduler's total step count
COCO_LIKE_SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (640, 426), (612, 612)]
PRECISIONS = ["amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "fp32"]  # training/params.py


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref-dir", default=".ref/DenseVLM", help="unpacked HVision-NKU/DenseVLM source tree")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--image-size", type=int, default=512, help="--det-image-size of the recipe")
    p.add_argument("--batch", type=int, default=2, help="per-process batch size")
    p.add_argument("--precision", default="amp", choices=PRECISIONS, help="the reference's --precision")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--depth", type=int, default=None, help="shrink both towers to N blocks (dry run)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON to this file (atomically)")
    p.add_argument("--commit", default=None, help="reference commit to report (default: <ref-dir>/COMMIT or git)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.batch < 1:
        p.error("--steps >= 1, --warmup >= 0, --batch >= 1")
    return a


def fail_missing_ref(ref: Path):
    msg = (
        f"bench_reference: no DenseVLM reference source at '{ref}' (need {ref}/src/training/densevlm.py).\n"
        "Get it (git-ignored, never commit it):\n"
        "  * with the session's fetch tool: fetch github:HVision-NKU/DenseVLM, then with G=<mirror>/repo\n"
        f"    mkdir -p {ref}/metadata && git --git-dir=$G archive HEAD -- . ':(exclude)assets' ':(exclude)metadata'"
        f" | tar -x -C {ref}\n"
        f"    for f in {Path(UVLM_EMBED).name} {Path(PVLM_EMBED).name}; do"
        f" git --git-dir=$G show HEAD:metadata/$f > {ref}/metadata/$f; done\n"
        f"    git --git-dir=$G rev-parse HEAD > {ref}/COMMIT\n"
        f"  * or: git clone https://github.com/HVision-NKU/DenseVLM {ref}\n"
        "It needs src/ and the two metadata/COCO_STUFF_ADE20k_Thing204_STUFF112_*.npy files.\n"
    )
    sys.stderr.write(msg)
    sys.exit(2)


def ref_commit(ref: Path, override: str | None) -> str | None:
    if override:
        return override
    f = ref / "COMMIT"
    if f.is_file():
        return f.read_text().strip() or None
    try:
        out = subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and (ref / ".git").exists():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def install_stubs() -> list[str]:
    """Empty stand-ins for modules the reference imports but this step never calls."""
    stubbed = []

    def stub(name, **attrs):
        mod = types.ModuleType(name)
        mod.__path__ = []  # behave as a package
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
        return mod

    def importable(name):
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            return False

    if not importable("panopticapi.utils"):  # git-only package; panoptic eval datasets
        stub("panopticapi")
        stub("panopticapi.utils")
        stubbed.append("panopticapi")
    if not importable("ftfy"):  # tokenizer text cleaning; no text is tokenized here
        stub("ftfy", fix_text=lambda s, *a, **k: s)
        stubbed.append("ftfy")
    if not importable("six.moves"):  # training/utils.py: `from six.moves import map, zip`
        stub("six")
        stub("six.moves", map=map, zip=zip)
        stubbed.append("six")
    if not (importable("pycocotools.coco") and importable("pycocotools.cocoeval")):  # COCO json / eval
        class _Unavailable:
            def __init__(self, *a, **k):
                raise RuntimeError("pycocotools is stubbed in bench_reference.py")
        for name in [m for m in sys.modules if m == "pycocotools" or m.startswith("pycocotools.")]:
            del sys.modules[name]
        stub("pycocotools")
        stub("pycocotools.coco", COCO=_Unavailable)
        stub("pycocotools.cocoeval", COCOeval=_Unavailable)
        stub("pycocotools.mask")
        stubbed.append("pycocotools")
    return stubbed


def write_model_configs(eva_factory, tmp: Path, depth: int | None, use_xattn: bool) -> dict:
    """Copies of the two EVA configs, registered so the reference's registry reads them."""
    changed = {}
    for name in (STUDENT, TEACHER):
        cfg = eva_factory.get_model_config(name)
        if cfg is None:
            raise RuntimeError(f"reference has no model config {name}")
        diff = {}
        if not use_xattn and cfg["vision_cfg"].get("xattn"):
            cfg["vision_cfg"]["xattn"] = False
            diff["vision_cfg.xattn"] = "true -> false"
        if depth is not None:
            diff["vision_cfg.layers"] = f"{cfg['vision_cfg']['layers']} -> {depth}"
            diff["text_cfg.layers"] = f"{cfg['text_cfg']['layers']} -> {depth}"
            cfg["vision_cfg"]["layers"] = depth
            cfg["text_cfg"]["layers"] = depth
        (tmp / f"{name}.json").write_text(json.dumps(cfg, indent=2))
        changed[name] = diff
    eva_factory.add_model_config(tmp)  # later paths override same-named configs
    for name in (STUDENT, TEACHER):
        got = eva_factory.get_model_config(name)
        assert got["vision_cfg"]["xattn"] == use_xattn or not changed[name], "config override not picked up"
        if depth is not None:
            assert got["vision_cfg"]["layers"] == depth, "config override not picked up"
    return changed


def make_coco_json(tmp: Path, n_images: int, rng: random.Random) -> tuple[Path, Path]:
    """A minimal COCO-format train json (only images[*].file_name is read) + random JPEGs."""
    import numpy as np
    from PIL import Image

    root = tmp / "images"
    root.mkdir()
    images = []
    nprng = np.random.default_rng(rng.randrange(2**31))
    for i in range(n_images):
        w, h = rng.choice(COCO_LIKE_SIZES)
        arr = nprng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        name = f"{i:012d}.jpg"
        Image.fromarray(arr).save(root / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    ann = tmp / "instances_synthetic.json"
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return ann, root


def build_batches(args, preprocess_train, preprocess_val, n_batches, tmp, rng, real_coco: bool):
    import torch
    from torch.utils.data import DataLoader

    import training.data as tdata

    ann, root = make_coco_json(tmp, n_batches * args.batch_size, rng)
    args.train_data = str(ann)
    args.train_image_root = str(root)
    args.val_data = None
    # batches are made before timing: workers only make that faster (the reference's own loader, its own workers)
    args.workers = min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0
    if real_coco:
        data = tdata.get_data(args, (preprocess_train, preprocess_val), epoch=0, tokenizer=None)
        loader = data["train"].dataloader
        how = "training.data.get_data -> GridDistillDataset + DataLoader"
    else:
        # pycocotools missing: build the reference's dataset object by hand, use its own methods
        ds = tdata.GridDistillDataset.__new__(tdata.GridDistillDataset)
        ds._init_choices(args.max_split)
        files = json.loads(ann.read_text())["images"]
        ds.coco = types.SimpleNamespace(imgs={im["id"]: im for im in files})
        ds.image_ids = list(ds.coco.imgs.keys())
        ds.transforms = preprocess_train
        ds.image_root = str(root)
        ds.args = args
        ds.max_anns = args.max_boxes
        s = args.input_size
        ds.crop_size = list(s) if isinstance(s, (tuple, list)) else [s, s]
        ds._init_boxes()
        ds.ceph_root, ds.use_ceph, ds.FILE_CLIENT, ds.pre_transforms = "", False, None, None
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            pin_memory=torch.cuda.is_available(), drop_last=True)
        how = "GridDistillDataset (built by hand, no pycocotools) + DataLoader"
    batches = [b for _, b in zip(range(n_batches), loader)]
    assert len(batches) == n_batches
    return batches, how


class TimedBatches:
    """Stands in for the reference's DataLoader: yields pre-made batches and stamps the
    (device-synchronised) time between consecutive requests, i.e. one full loop body."""

    def __init__(self, batches, sync, num_batches, num_samples):
        self.batches = batches
        self.sync = sync
        self.num_batches = num_batches
        self.num_samples = num_samples
        self.stamps = []

    def __iter__(self):
        for b in self.batches:
            self.sync()
            self.stamps.append(time.perf_counter())
            yield b
        self.sync()
        self.stamps.append(time.perf_counter())


class KLCounter:
    """Transparent proxy for ``torch.nn.functional`` inside training.densevlm that counts
    the regions reaching the KL terms (after the 0.3 confidence filter)."""

    def __init__(self, F):
        self._F = F
        self.rows = []  # per step: list of rows per kl_div call

    def __getattr__(self, name):
        return getattr(self._F, name)

    def kl_div(self, inp, target, *a, **k):
        if self.rows:
            self.rows[-1].append(int(inp.shape[0]))
        return self._F.kl_div(inp, target, *a, **k)


def peak_rss_bytes() -> int:
    """The process's peak resident memory, as tools/bench_train.py measures it (densevlm.utils.peak)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from densevlm.utils.peak import peak_rss

    return peak_rss()


def run(cli, real_stdout):
    ref = Path(cli.ref_dir).resolve()
    if not (ref / "src" / "training" / "densevlm.py").is_file():
        fail_missing_ref(ref)
    for f in (UVLM_EMBED, PVLM_EMBED):
        if not (ref / f).is_file():
            sys.stderr.write(f"bench_reference: missing {ref / f} (part of the reference repo)\n")
            sys.exit(2)

    import torch

    if cli.threads:
        torch.set_num_threads(cli.threads)
    device_str = cli.device or ("cuda" if torch.cuda.is_available() else "cpu")
    is_cuda = device_str.startswith("cuda")
    if is_cuda and not torch.cuda.is_available():
        sys.stderr.write("bench_reference: --device cuda but CUDA is not available\n")
        sys.exit(2)

    stubbed = install_stubs()
    xformers_ok = importlib.util.find_spec("xformers") is not None
    sys.path.insert(0, str(ref / "src"))
    for name in list(sys.modules):  # never mix with an installed open_clip_torch
        if name == "open_clip" or name.startswith("open_clip.") or name == "training" or name.startswith("training."):
            del sys.modules[name]
    import open_clip
    from open_clip.eva_clip import factory as eva_factory
    from open_clip.eva_clip import model as eva_model
    import training.densevlm as tdensevlm
    from training.densevlm import DenseVLM
    from training.distributed import init_distributed_device
    from training.params import parse_args
    from training.scheduler import cosine_lr
    from training.train import train_one_epoch
    from training.data import DataInfo

    if not Path(open_clip.__file__).resolve().is_relative_to(ref):
        raise RuntimeError(f"imported open_clip from {open_clip.__file__}, not from {ref}")

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_reference_")
    tmp = Path(tmp_ctx.name)
    cfg_dir = tmp / "model_configs"
    cfg_dir.mkdir()
    use_xattn = xformers_ok
    cfg_changes = write_model_configs(eva_factory, cfg_dir, cli.depth, use_xattn)

    # The recipe's flags (scripts/train_densevlm_coco_image_patches_eva_vitb16.sh); data paths
    # are filled in later, --cache-dir is dropped (random init), batch/size/precision from the CLI.
    recipe = [
        f"--batch-size={cli.batch}", "--lr=1e-5", "--wd=0.1", "--epochs=6", "--workers=0",
        "--model", STUDENT, "--pretrained", "eva", "--warmup", "1000", "--zeroshot-frequency", "1",
        "--dataset-type", "grid_distill", "--test-type", "coco_panoptic",
        "--uvlm-embed-path", str(ref / UVLM_EMBED), "--pvlm-embed-path", str(ref / PVLM_EMBED),
        "--log-every-n-steps", "50", "--lock-image", "--save-frequency", "6",
        "--lock-image-unlocked-groups", "12", "--extract-type=v2", "--name", "bench_reference",
        "--downsample-factor", "16", "--det-image-size", str(cli.image_size), "--alpha", "0.9",
        "--precision", cli.precision, "--seed", str(cli.seed),
    ]
    args = parse_args(recipe)
    args.cache_dir = None  # no checkpoint: random init through the same 'eva' code path
    args.logs = None
    args.save_logs = False

    if torch.cuda.is_available():  # as training/main.py
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
    init_distributed_device(args)  # single process: rank 0, world 1, not distributed
    if not is_cuda:
        args.device = "cpu"
    elif device_str != "cuda":
        args.device = device_str
        torch.cuda.set_device(device_str)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        args.model, args.pretrained, precision=args.precision, device=device, jit=args.torchscript,
        force_quick_gelu=args.force_quick_gelu, force_custom_text=args.force_custom_text,
        force_patch_dropout=args.force_patch_dropout, force_image_size=args.force_image_size,
        pretrained_image=args.pretrained_image, image_mean=args.image_mean, image_std=args.image_std,
        aug_cfg=args.aug_cfg, output_dict=True, cache_dir=args.cache_dir,
        det_image_size=args.det_image_size, dataset_type=args.dataset_type)
    args.input_size = model.visual.image_size
    dist_P_VLM = open_clip.create_model(TEACHER, "eva", device=device, precision=args.precision,
                                        output_dict=True, cache_dir=None)
    method = DenseVLM(args=args).to(device)
    if args.lock_image:
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    build_s = time.perf_counter() - t0

    # optimizer / scaler as training/main.py builds them
    def no_decay(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if no_decay(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not no_decay(n, p) and p.requires_grad], "weight_decay": args.wd}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    scaler = None
    if args.precision == "amp":
        scaler = torch.cuda.amp.GradScaler() if hasattr(torch.cuda.amp, "GradScaler") else torch.amp.GradScaler("cuda")

    num_batches = COCO_TRAIN_IMAGES // args.batch_size  # one process, drop_last, as len(dataloader)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, num_batches * args.epochs)

    n_steps = cli.warmup + cli.steps
    t1 = time.perf_counter()
    real_coco = "pycocotools" not in stubbed
    batches, batch_source = build_batches(args, preprocess_train, preprocess_val, n_steps, tmp, rng, real_coco)
    data_s = time.perf_counter() - t1
    boxes_per_step = [int((b[1][..., 4] > 0.5).sum()) for b in batches]
    batch_shapes = [list(t.shape) for t in batches[0]]

    def sync():
        if is_cuda:
            torch.cuda.synchronize(device)

    timed = TimedBatches(batches, sync, num_batches=num_batches, num_samples=num_batches * args.batch_size)
    data = {"train": DataInfo(dataloader=timed, sampler=None)}
    counter = KLCounter(tdensevlm.F)
    tdensevlm.F = counter
    orig_call = DenseVLM.__call__
    step_losses = []

    def counting_call(self, *a, **k):  # start a new per-step record, then the reference's own __call__
        counter.rows.append([])
        out = orig_call(self, *a, **k)
        step_losses.append(out[0]["loss_kl"].detach())
        return out

    DenseVLM.__call__ = counting_call
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        train_one_epoch(model, method, data, None, 0, optimizer, scaler, scheduler, dist_P_VLM, None, args)
    finally:
        DenseVLM.__call__ = orig_call
        tdensevlm.F = counter._F

    stamps = timed.stamps
    per_step = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    assert len(per_step) == n_steps, (len(per_step), n_steps)
    timed_steps = per_step[cli.warmup:]
    med = statistics.median(timed_steps)
    peak = torch.cuda.max_memory_allocated(device) if is_cuda else peak_rss_bytes()

    attn_mods = [blk.attn for blk in model.visual.blocks] + [blk.attn for blk in dist_P_VLM.visual.blocks]
    xattn_used = any(getattr(m, "xattn", False) for m in attn_mods)
    if xattn_used:
        attention = "xformers memory_efficient_attention (reference xattn branch)"
    else:
        attention = ("plain matmul softmax (reference eva_vit_model.Attention non-xattn branch: "
                     "q*scale @ k^T, softmax, @ v); xformers " + ("available but off" if xformers_ok else "unavailable")
                     + ", vision configs xattn true->false; last block forward_without_attn (v-path only)")
    fused_ln = getattr(eva_model, "FusedLayerNorm", None)
    layernorm = ("apex FusedLayerNorm" if fused_ln is not None and "apex" in getattr(fused_ln, "__module__", "")
                 else "eva_clip LayerNorm (apex unavailable; reference fallback)")
    if args.precision == "amp":
        amp_desc = "torch.cuda.amp.autocast (fp16) + torch.cuda.amp.GradScaler"
        if not is_cuda:
            amp_desc += " -- both disabled by torch on CPU, so this ran in fp32"
    elif args.precision.startswith("amp_b"):
        amp_desc = "torch.cuda.amp.autocast(dtype=bfloat16), no GradScaler" + ("" if is_cuda else " -- disabled on CPU")
    else:
        amp_desc = f"no autocast; weights {args.precision}"

    n_student = sum(p.numel() for p in model.visual.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "impl": "reference",
        "repo": "HVision-NKU/DenseVLM",
        "commit": ref_commit(ref, cli.commit),
        "recipe": RECIPE,
        "device": (torch.cuda.get_device_name(device) if is_cuda
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "image_size": cli.image_size,
        "batch": cli.batch,
        "precision": cli.precision,
        "autocast": amp_desc,
        "attention": attention,
        "layernorm": layernorm,
        "student": STUDENT, "teacher": TEACHER,
        "depth": cli.depth,
        "student_visual_params": n_student,
        "trainable_params": n_trainable,
        "config_changes": cfg_changes,
        "weights": "random init (no checkpoints)",
        "batch_source": batch_source,
        "batch_shapes": batch_shapes,
        "boxes_per_step": boxes_per_step[cli.warmup:],
        "kl_regions_per_step": [sum(r) for r in counter.rows][cli.warmup:],
        "loss_kl_per_step": [(v if math.isfinite(v) else None) for v in (float(x) for x in step_losses)][cli.warmup:],
        "grad_scaler_scale_end": (float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None),
        "stubbed_modules": stubbed,
        "warmup": cli.warmup,
        "steps": cli.steps,
        "step_seconds_median": med,
        "step_seconds": timed_steps,
        "warmup_step_seconds": per_step[:cli.warmup],
        "images_per_second": cli.batch / med,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if is_cuda else "VmHWM (process peak RSS)",
        "build_seconds": build_s,
        "data_prep_seconds": data_s,
    }
    tmp_ctx.cleanup()
    text = json.dumps(result)
    if cli.json_out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from densevlm.utils.io import atomic_write_text

        atomic_write_text(cli.json_out, text + "\n")
    real_stdout.write(text + "\n")
    real_stdout.flush()


def main(argv=None):
    cli = parse_cli(argv)
    real_stdout = sys.stdout
    # the reference prints to stdout ("Please 'pip install xformers'", rope messages, ...):
    # keep stdout for the JSON only
    with contextlib.redirect_stdout(sys.stderr):
        run(cli, real_stdout)


if __name__ == "__main__":
    main()
