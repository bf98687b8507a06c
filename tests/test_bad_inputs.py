"""Bad inputs users actually hit, for every command: a clear message naming the file/key/value, a non-zero exit
code, and nothing half-written.

One row per (command, bad input) in ``CASES``; adding a command's rows is adding entries there. Each row builds
its inputs in a fresh folder, runs the real command line in-process (``densevlm.cli.main``) and checks the exit
code, the message, and what was written. For a failing row the message must be in the command's error line on
stderr (a warning does not count), and the row's whole folder must be exactly as before the command (every path,
size, content hash and mtime): no half-written file, no staging folder, no run directory that would block the
corrected rerun, no input touched. Only what a row lists in ``leaves`` (e.g. the last good checkpoint a NaN
stop names) may appear. The README's "Failure behaviour" table is this table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from densevlm import cli
from densevlm.config.toyworld import ToyWorldConfig

TINY = {"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32, "heads": 1}}
OTHER = {"vision_cfg": {"layers": 1, "width": 32, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32, "heads": 1},
         "embed_dim": 48}
TOY = "ToyCLIP-ViT-T-16"


# --------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny toy world (8 train, 4 val images at 64 px), shared read-only by the rows."""
    from densevlm.toyworld import generate_world

    root = tmp_path_factory.mktemp("bad_inputs") / "world"
    generate_world(ToyWorldConfig(num_train=8, num_val=4, image_size=64, workers=0), root, progress=False)
    return root


@dataclass
class Env:
    """The folder a row works in, and the shared world."""

    tmp: Path
    world: Path

    @property
    def out(self) -> Path:  # every row writes its outputs under here
        return self.tmp / "out"

    def write_yaml(self, name: str, data: dict) -> str:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def images(self, name: str = "images", n: int = 4) -> Path:
        """``n`` small RGB PNGs in a folder of their own."""
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        return folder

    def vocab(self, names: list[str], name: str = "vocab.json") -> str:
        classes = [{"name": n, "isthing": i < 2} for i, n in enumerate(names)]
        path = self.tmp / name
        path.write_text(json.dumps({"name": "tiny", "classes": classes}))
        return str(path)

    def captions(self, image_root: Path, files: list[str], name: str = "captions.json") -> str:
        data = {"images": [{"id": i, "file_name": f} for i, f in enumerate(files)],
                "annotations": [{"id": i, "image_id": i, "caption": f"a photo number {i}"}
                                for i in range(len(files))]}
        path = self.tmp / name
        path.write_text(json.dumps(data))
        return str(path)

    def weights(self, overrides: dict, name: str) -> str:
        """A weights file (open_clip layout) of a toy CLIP with these architecture overrides."""
        from safetensors.torch import save_file

        from densevlm.config.model import ModelSpec
        from densevlm.models import create_backbone

        model = create_backbone(ModelSpec(name=TOY, model_overrides=overrides))
        path = self.tmp / name
        save_file({k: v.contiguous() for k, v in model.state_dict_for_export().items()}, str(path))
        return str(path)

    def embeddings(self, dim: int, name: str) -> str:
        """A text-embedding file for the 4-class vocabulary, as built by another model of dimension ``dim``."""
        from densevlm.vocab.cache import save_text_embeddings

        path = self.tmp / name
        save_text_embeddings(path, torch.nn.functional.normalize(torch.randn(4, dim), dim=-1),
                             {"model_name": "ToyCLIP-wide"})
        return str(path)

    def evil_pickle(self, name: str = "evil.pt") -> str:
        """A torch file whose unpickling would run a shell command (creating ``pwned``)."""
        marker = self.tmp / "pwned"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        path = self.tmp / name
        torch.save({"state_dict": {"w": Evil()}}, path)
        return str(path)


# --------------------------------------------------------------------------- command lines
def train_argv(env: Env, *sets: str, images: Optional[Path] = None, vocab: Optional[str] = None,
               teacher_text: Optional[dict] = None) -> list[str]:
    """``densevlm train`` of DenseVLM on tiny random toy CLIPs, 2 steps, on the CPU."""
    images = images or env.images()
    vocab = vocab or env.vocab(["boat", "car", "sky", "grass"])
    cfg = {
        "output_dir": str(env.out / "run"), "method": "densevlm",
        "student": {"name": TOY, "model_overrides": TINY}, "teacher": {"name": TOY, "model_overrides": TINY},
        "student_text": {"vocabulary": vocab, "templates": "single"},
        "teacher_text": {"vocabulary": vocab, "templates": "single", **(teacher_text or {})},
        "densevlm": {"threshold": 0.0},
        "data": {"source": {"kind": "folder", "path": str(images)}, "image_size": 64, "max_boxes": 4},
        "loop": {"epochs": 1, "batch_size": 2, "num_workers": 0, "cpu": True, "log_every": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
    }
    return ["train", "--config", env.write_yaml("train.yaml", cfg), "--set", *sets] if sets else \
        ["train", "--config", env.write_yaml("train.yaml", cfg)]


def pretrain_argv(env: Env, captions: str, image_root: Path, *sets: str) -> list[str]:
    cfg = {
        "output_dir": str(env.out / "run"), "model": {"name": TOY, "model_overrides": TINY},
        "data": {"captions_json": captions, "image_root": str(image_root), "image_size": 32},
        "loop": {"epochs": 1, "batch_size": 2, "num_workers": 0, "cpu": True},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
    }
    argv = ["pretrain", "--config", env.write_yaml("pretrain.yaml", cfg)]
    return argv + ["--set", *sets] if sets else argv


def eval_argv(env: Env, panoptic_json: Optional[str] = None, *sets: str, panoptic_root: str = "") -> list[str]:
    w = env.world
    cfg = {
        "output_dir": str(env.out / "eval"), "model": {"name": TOY, "model_overrides": TINY},
        "data": {"panoptic_json": panoptic_json or str(w / "annotations" / "panoptic_val.json"),
                 "panoptic_root": panoptic_root or str(w / "annotations" / "panoptic_val"),
                 "image_root": str(w / "images" / "val"), "image_size": 64},
        "text": {"vocabulary": str(w), "templates": "single"},
        "batch_size": 2, "num_workers": 0, "device": "cpu",
    }
    argv = ["eval", "regions", "--config", env.write_yaml("eval.yaml", cfg)]
    return argv + ["--set", *sets] if sets else argv


def embed_argv(env: Env, *extra: str, vocabulary: Optional[str] = None) -> list[str]:
    return ["embed-text", "--model", TOY, "--vocabulary", vocabulary or env.vocab(["boat", "car", "sky", "grass"]),
            "--templates", "single", "--no-progress", *extra]


def semseg_argv(env: Env, *sets: str, label_root: Optional[str] = None) -> list[str]:
    """``densevlm eval semseg`` of a tiny random toy CLIP on the shared world's val split."""
    w = env.world
    cfg = {
        "output_dir": str(env.out / "semseg"), "model": {"name": TOY, "model_overrides": TINY},
        "data": {"image_root": str(w / "images" / "val"),
                 "label_root": label_root or str(w / "annotations" / "semantic_val")},
        "text": {"vocabulary": str(w), "templates": "single"},
        "inference": {"short_side": 64, "batch_size": 4}, "figures": 0, "num_workers": 0, "device": "cpu",
    }
    argv = ["eval", "semseg", "--config", env.write_yaml("semseg.yaml", cfg)]
    return argv + ["--set", *sets] if sets else argv


def cache_teacher_argv(env: Env, *sets: str, images: Optional[Path] = None) -> list[str]:
    """``densevlm cache-teacher`` of the train rows' DenseVLM recipe into ``out/teacher_cache``."""
    return ["cache-teacher", *train_argv(env, f"teacher_cache={env.out / 'teacher_cache'}", *sets, images=images)[1:]]


T2D_SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4}  # a DINOv2-with-registers ViT small enough for a row


def talk2dino_argv(env: Env, task: str, *sets: str, captions: Optional[str] = None,
                   image_root: Optional[Path] = None) -> list[str]:
    """``densevlm talk2dino cache|train`` of a tiny random DINOv2-reg and toy text tower on the rows' images."""
    if captions is None:
        image_root = env.images()
        captions = env.captions(image_root, [f"{i:03d}.png" for i in range(4)])
    cfg = {
        "output_dir": str(env.out / "psi"),
        "vision": {"family": "dinov2", "name": "dinov2_vitb14_reg", "timm_kwargs": T2D_SMALL},
        "text": {"name": TOY, "pretrained": None, "model_overrides": TINY},
        "data": {"captions_json": captions, "image_root": str(image_root), "image_size": 28},
        "cache": {"dir": str(env.out / "t2d_cache"), "batch_size": 4, "num_workers": 0, "device": "cpu",
                  "dtype": "float32"},
        "loop": {"epochs": 1, "batch_size": 4, "cpu": True, "checkpoint_every": 1},
    }
    argv = ["talk2dino", task, "--config", env.write_yaml("t2d.yaml", cfg)]
    return argv + ["--set", *sets] if sets else argv


def det_argv(env: Env, task: str, *sets: str) -> list[str]:
    """``densevlm det train|eval`` of the toy recipe on the shared world, into ``out/det``."""
    return ["det", task, "--config", "configs/det/toy.yaml", "--set", f"output_dir={env.out / 'det'}",
            f"data.root={env.world}", "num_workers=0", "device=cpu", *sets]


def export_argv(env: Env, *extra: str, fmt: str = "open_clip") -> list[str]:
    """``densevlm export`` of a toy CLIP weights file (``--name`` says its architecture) into ``out/export``."""
    weights = env.weights({}, "toy.safetensors")
    return ["export", "--model", weights, "--name", TOY, "--format", fmt, "--out",
            str(env.out / "export" / "model.safetensors"), *extra]


def _own_run(env: Env, name: str = "run") -> None:
    """A run directory of the user's own (a config and a checkpoint) where a row's command would write."""
    ckpts = env.out / name / "checkpoints"
    ckpts.mkdir(parents=True)
    (env.out / name / "config.yaml").write_text("output_dir: mine\n")
    (ckpts / "step_00000007.pt").write_bytes(b"my checkpoint")


def _zoo_entry(env: Env, name: str = "toy-student") -> str:
    """A publish folder that already holds zoo entry ``name`` (someone's earlier build)."""
    folder = env.tmp / "published"
    folder.mkdir()
    (folder / f"{name}.safetensors").write_bytes(b"weights")
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "models": {name: {
        "architecture": TOY, "file": f"{name}.safetensors", "sha256": "0" * 64}}}))
    return str(folder)


def copy_panoptic(env: Env, edit: Callable[[dict, Path], None]) -> tuple[str, str]:
    """A copy of the world's panoptic val json and PNG folder, changed by ``edit(json_data, png_folder)``."""
    src = env.world / "annotations"
    png = env.tmp / "panoptic_val"
    shutil.copytree(src / "panoptic_val", png)
    data = json.loads((src / "panoptic_val.json").read_text())
    edit(data, png)
    path = env.tmp / "panoptic_val.json"
    path.write_text(json.dumps(data))
    return str(path), str(png)


# --------------------------------------------------------------------------- simulated failures
@contextlib.contextmanager
def disk_full_after(nbytes: int) -> Iterator[None]:
    """Any write that makes a file larger than ``nbytes`` fails (EFBIG), as on a full disk (ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an OSError instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (relative) with its kind, size, content hash and mtime: what "left exactly as
    before" compares."""
    state: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            state[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_dir():
            state[str(p.relative_to(root))] = ("dir",)
        else:
            state[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def tree_changes(before: dict[str, tuple], after: dict[str, tuple], allowed: tuple[str, ...] = ()) -> list[str]:
    """What differs between two snapshots, except new paths matching an ``allowed`` glob (and their folders)."""
    def ok(path: str) -> bool:
        return any(fnmatch.fnmatch(path, g) or any(fnmatch.fnmatch(q, g) for q in after if q.startswith(path + "/"))
                   for g in allowed)

    changes = [f"removed {p}" for p in before if p not in after]
    changes += [f"changed {p}" for p in before if p in after and before[p] != after[p]]
    changes += [f"new {p}" for p in after if p not in before and not ok(p)]
    return changes


@contextlib.contextmanager
def zoo_env(env: Env, corrupt: bool = False, drop: Optional[str] = None) -> Iterator[None]:
    """$DENSEVLM_ZOO at a one-model zoo in the row's folder (its weights: a tiny toy CLIP)."""
    zoo = env.tmp / "zoo"
    zoo.mkdir()
    weights = Path(env.weights(TINY, "tiny.safetensors")).rename(zoo / "tiny.safetensors")
    from densevlm.utils.hashing import sha256_file

    row = {"architecture": TOY, "file": weights.name, "sha256": "0" * 64 if corrupt else sha256_file(weights)}
    row.pop(drop, None)
    (zoo / "manifest.json").write_text(json.dumps({"format": 1, "models": {"toy-tiny": row}}))
    previous = os.environ.get("DENSEVLM_ZOO")
    os.environ["DENSEVLM_ZOO"] = str(zoo)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DENSEVLM_ZOO"]
        else:
            os.environ["DENSEVLM_ZOO"] = previous


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    command: str
    bad_input: str
    argv: Callable[[Env], list[str]]
    code: int
    message: str  # a regex; "{tmp}" and "{world}" are replaced by the row's folders (escaped)
    behaviour: str  # for the README table
    during: Optional[Callable[[Env], contextlib.AbstractContextManager]] = None  # e.g. a full disk
    check: Optional[Callable[[Env], None]] = None  # more assertions on what was (not) written
    leaves: tuple[str, ...] = ()  # globs (relative to the row's folder) a failing row may leave: kept checkpoints
    needs: Optional[str] = None  # a module the command needs (the row is skipped without it)

    @property
    def id(self) -> str:
        return f"{self.command}:{self.bad_input}"


def _bad_png(env: Env, folder: Path, kind: str) -> str:
    """Write one bad image into ``folder`` and return its path."""
    path = folder / f"bad_{kind}.png"
    good = (folder / "000.png").read_bytes()
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "huge":
        # A real PNG header claiming 30000 x 30000 pixels (900 M, 10 x PIL's decompression-bomb limit).
        import struct
        import zlib

        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                         + chunk(b"IEND", b""))
    elif kind == "empty":
        path.write_bytes(b"")
    return str(path)


def _odd_modes(env: Env) -> Path:
    """Valid images in the modes users' datasets contain: grayscale, CMYK JPEG, 16-bit PNG, palette, RGBA."""
    folder = env.tmp / "modes"
    folder.mkdir()
    g = np.linspace(0, 1, 40 * 56).reshape(40, 56)
    Image.fromarray((g * 255).astype(np.uint8), "L").save(folder / "gray.png")
    Image.fromarray((g * 255).astype(np.uint8), "L").convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((g * 65535).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray((g * 255).astype(np.uint8), "L").convert("P").save(folder / "palette.png")
    Image.fromarray(np.zeros((40, 56, 4), np.uint8), "RGBA").save(folder / "rgba.png")
    return folder


def _with_bad_image(kind: str) -> Callable[[Env], list[str]]:
    def argv(env: Env) -> list[str]:
        folder = env.images()
        _bad_png(env, folder, kind)
        return train_argv(env, images=folder)
    return argv


def _pretrain_bad_image(kind: str, *sets: str) -> Callable[[Env], list[str]]:
    def argv(env: Env) -> list[str]:
        folder = env.images()
        files = sorted(p.name for p in folder.glob("*.png"))
        if kind == "missing":
            files.append("gone.png")
        else:
            files.append(Path(_bad_png(env, folder, kind)).name)
        return pretrain_argv(env, env.captions(folder, files), folder, *sets)
    return argv


def _resume_after(env: Env, damage: Callable[[Path], None]) -> list[str]:
    """Train 2 steps, damage the checkpoint with ``damage(path)``, then ``--resume``."""
    argv = train_argv(env)
    assert cli.main(argv) == 0
    damage(env.out / "run" / "checkpoints" / "step_00000002.pt")
    return argv + ["--resume"]


def _swap_model(ckpt: Path) -> None:
    """Replace the checkpoint by one of a model with other shapes, with a valid checksum (someone copied it in)."""
    from densevlm.engine.checkpoint import LATEST
    from densevlm.utils.hashing import sha256_file

    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v
                      for k, v in state["model"].items()}
    torch.save(state, ckpt)
    pointer = ckpt.parent / LATEST
    info = json.loads(pointer.read_text())
    info["checkpoints"][-1]["sha256"] = sha256_file(ckpt)
    pointer.write_text(json.dumps(info))


def _json_file(env: Env, name: str, text: str) -> str:
    path = env.tmp / name
    path.write_text(text)
    return str(path)


def _out_is_absent(env: Env) -> None:
    assert not env.out.exists() or not any(env.out.rglob("weights.safetensors"))


def _nothing_in(sub: str) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        folder = env.out / sub
        leftovers = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
        assert not leftovers, leftovers
    return check


CASES: list[Case] = [
    # ---------------------------------------------------------------- toyworld
    Case("toyworld", "config with an unknown key",
         lambda e: ["toyworld", "--config", e.write_yaml("w.yaml", {"num_train": 4, "context_porb": 0.5}),
                    "--out", str(e.out / "w")],
         2, r"w\.yaml: unknown config key 'context_porb'; did you mean 'context_prob'",
         "config error naming the file and the key", check=_nothing_in("w")),
    Case("toyworld", "unknown --set key",
         lambda e: ["toyworld", "--set", "num_trian=4", "--out", str(e.out / "w")],
         2, r"unknown config key 'num_trian'.*did you mean 'num_train'", "config error suggesting the closest key"),
    Case("toyworld", "--out is a non-empty folder",
         lambda e: (e.out.mkdir(), (e.out / "keep.txt").write_text("mine"), ["toyworld", "--out", str(e.out)])[-1],
         1, r"{tmp}/out.*not empty|exists", "refused naming the folder; the folder is left untouched",
         check=lambda e: (e.out / "keep.txt").read_text() == "mine" or pytest.fail("touched")),
    Case("toyworld", "full disk while writing (simulated)",
         lambda e: ["toyworld", "--set", "num_train=4", "num_val=2", "image_size=64", "workers=0",
                    "--out", str(e.out / "w")],
         1, r"cannot write the toy world {tmp}/out/w: File too large \(the staging folder was removed",
         "error naming the world; --out never appears, no staging folder left",
         during=lambda e: disk_full_after(2000), check=_nothing_in("w")),
    # ---------------------------------------------------------------- pretrain
    Case("pretrain", "captions json is empty",
         lambda e: pretrain_argv(e, _json_file(e, "captions.json", ""), e.images()),
         1, r"{tmp}/captions\.json: not valid JSON", "error naming the file", check=_out_is_absent),
    Case("pretrain", "captions json is malformed (no 'annotations')",
         lambda e: pretrain_argv(e, _json_file(e, "captions.json", '{"images": []}'), e.images()),
         1, r"{tmp}/captions\.json.*annotations", "error naming the file and the missing key"),
    Case("pretrain", "an image listed in the json is missing", _pretrain_bad_image("missing"),
         1, r"1 image\(s\) listed in {tmp}/captions\.json are missing under {tmp}/images, e\.g\. {tmp}/images/gone\.png; "
            r"set data\.skip_bad_images=true", "error naming the file and the skip option", check=_out_is_absent),
    Case("pretrain", "missing image with data.skip_bad_images=true",
         _pretrain_bad_image("missing", "data.skip_bad_images=true"),
         0, r"skipping 1 missing image\(s\) listed in {tmp}/captions\.json \(e\.g\. {tmp}/images/gone\.png\)",
         "a warning with the count; training goes on"),
    Case("pretrain", "corrupt image", _pretrain_bad_image("corrupt"),
         1, r"cannot read image {tmp}/images/bad_corrupt\.png", "error naming the file"),
    Case("pretrain", "truncated image", _pretrain_bad_image("truncated"),
         1, r"cannot read image {tmp}/images/bad_truncated\.png", "error naming the file"),
    Case("pretrain", "empty (0-byte) image", _pretrain_bad_image("empty"),
         1, r"cannot read image {tmp}/images/bad_empty\.png", "error naming the file"),
    Case("pretrain", "huge image (decompression bomb)", _pretrain_bad_image("huge"),
         1, r"cannot read image {tmp}/images/bad_huge\.png: .*900000000 pixels", "error naming the file and its size"),
    Case("pretrain", "NaN in the loss",
         lambda e: pretrain_argv(e, e.captions(e.images(), [f"{i:03d}.png" for i in range(4)]), e.tmp / "images",
                                 "optim.lr=1e30", "optim.eps=1e-30"),
         1, r"non-finite (loss|gradient) .* at step \d+ \(epoch 1, batch \d/2\); batch images on process 0: \d \({tmp}/images/\d+\.png\)",
         "stops naming the step, the batch's images and the last good checkpoint"),
    # ---------------------------------------------------------------- train
    Case("train", "config with an unknown key deep inside",
         lambda e: train_argv(e, "data.source.kindd=folder"),
         2, r"unknown config key 'data\.source\.kindd' in override.*did you mean 'kind'",
         "config error naming the full key path"),
    Case("train", "YAML with an unknown key deep inside",
         lambda e: ["train", "--config", e.write_yaml("t.yaml", {"data": {"source": {"kind": "folder", "pth": "x"}}})],
         2, r"{tmp}/t\.yaml: unknown config key 'data\.source\.pth'; did you mean 'path'",
         "config error naming the file and the key path"),
    Case("train", "corrupt image in the folder", _with_bad_image("corrupt"),
         1, r"cannot read image {tmp}/images/bad_corrupt\.png", "error naming the file", check=_out_is_absent),
    Case("train", "truncated image in the folder", _with_bad_image("truncated"),
         1, r"cannot read image {tmp}/images/bad_truncated\.png", "error naming the file"),
    Case("train", "corrupt image with data.source.skip_bad_images=true",
         lambda e: (_bad_png(e, e.images(), "corrupt"),
                    train_argv(e, "data.source.skip_bad_images=true", images=e.tmp / "images"))[1],
         0, r"cannot read image {tmp}/images/bad_corrupt\.png: .*; skipped \(data\.source\.skip_bad_images\)",
         "a warning naming the file; training goes on"),
    Case("train", "--resume from a truncated checkpoint (no older one)",
         lambda e: _resume_after(e, lambda ckpt: ckpt.write_bytes(ckpt.read_bytes()[:1000])),
         1, r"no usable checkpoint: checkpoint {tmp}/out/run/checkpoints/step_00000002\.pt is corrupted or truncated",
         "refused naming the file (with an older good one: a warning and resume from it)"),
    Case("train", "--resume from a checkpoint of another model",
         lambda e: _resume_after(e, _swap_model),
         1, r"checkpoint {tmp}/out/run/checkpoints/step_00000002\.pt does not fit this model/optimiser: .*size mismatch",
         "refused naming the file and the mismatching tensors"),
    Case("train", "grayscale, CMYK, 16-bit, palette and RGBA images",
         lambda e: train_argv(e, images=_odd_modes(e)),
         0, r"densevlm training done", "accepted: converted to 8-bit RGB (16-bit scaled, not clipped)"),
    Case("train", "vocabulary with a duplicate name",
         lambda e: train_argv(e, vocab=e.vocab(["boat", "car", "sky", "sky"])),
         1, r"{tmp}/vocab\.json: vocabulary 'tiny': duplicate stuff class name 'sky' \(classes 2 and 3\)",
         "error naming the file, the name and both positions"),
    Case("train", "vocabulary with an empty name",
         lambda e: train_argv(e, vocab=e.vocab(["boat", " ", "sky", "grass"])),
         1, r"{tmp}/vocab\.json.*(empty|blank)", "error naming the file and the class"),
    Case("train", "teacher text embeddings of another dimension",
         lambda e: train_argv(e, teacher_text={"embeddings_path": e.embeddings(48, "wide.safetensors")}),
         1, r"{tmp}/wide\.safetensors: text embeddings of dimension 48, but model ToyCLIP-ViT-T-16 embeds into "
            r"128 dimensions; the file was built by ToyCLIP-wide", "error naming the file and both dimensions"),
    Case("train", "student weights of another model",
         lambda e: train_argv(e, f"student.pretrained={e.weights(OTHER, 'other.safetensors')}"),
         1, r"{tmp}/other\.safetensors", "error naming the file and the mismatching tensors"),
    Case("train", "weights file that is a pickle with code in it",
         lambda e: train_argv(e, f"student.pretrained={e.evil_pickle()}"),
         1, r"{tmp}/evil\.pt", "refused (weights-only loading), naming the file; the code never runs",
         check=lambda e: not (e.tmp / "pwned").exists() or pytest.fail("the pickle's code ran")),
    Case("train", "NaN in the loss",
         lambda e: train_argv(e, "optim.lr=1e30", "optim.eps=1e-30", "loop.checkpoint_every_steps=1"),
         1, r"non-finite .* at step \d \(epoch 1, batch \d/2\); batch images on process 0: \d \({tmp}/images/\d+\.png\), "
            r"\d \(.*\); last good checkpoint: {tmp}/out/run/checkpoints/step_0000000\d\.pt",
         "stops naming the step, the batch's images and the last good checkpoint (the run is kept: --resume)",
         leaves=("out/run/*",)),
    Case("train", "NaN in the loss with loop.on_nonfinite=skip",
         lambda e: train_argv(e, "optim.lr=1e30", "optim.eps=1e-30", "loop.on_nonfinite=skip"),
         0, r"non-finite loss or gradient, step skipped", "a warning per step; the count is in metrics.json",
         check=lambda e: json.loads((e.out / "run" / "metrics.json").read_text())["nonfinite_skipped"] >= 1
         or pytest.fail("not counted")),
    Case("train", "full disk while writing the checkpoint (simulated)",
         lambda e: train_argv(e),
         1, r"cannot write {tmp}/out/run/checkpoints/step_00000002\.pt", "error naming the file; no partial file",
         during=lambda e: disk_full_after(200_000), check=lambda e: _nothing_in("run/checkpoints")(e)),
    Case("train", "output_dir holds a run of the user's (no --resume)",
         lambda e: (_own_run(e), train_argv(e))[1],
         1, r"run directory {tmp}/out/run already exists and is not empty; pass resume",
         "refused before any model or data is loaded, naming the folder; the folder is left untouched"),
    Case("train", "--resume with a changed config",
         lambda e: (cli.main(train_argv(e)), train_argv(e, "optim.lr=0.5", "--resume"))[1],
         2, r"cannot resume from {tmp}/out/run: its config differs in 1 key\(s\): optim\.lr \(0\.001 -> 0\.5\)",
         "config error naming the folder and each changed key with both values; the run is left untouched"),
    # ---------------------------------------------------------------- eval regions
    Case("eval regions", "panoptic json is empty",
         lambda e: eval_argv(e, _json_file(e, "pan.json", "")),
         1, r"{tmp}/pan\.json: not valid JSON", "error naming the file", check=_nothing_in("eval")),
    Case("eval regions", "panoptic json is malformed (no 'segments_info')",
         lambda e: eval_argv(e, *copy_panoptic(e, lambda d, png: d["annotations"][0].pop("segments_info"))[:1],
                             panoptic_root=str(e.tmp / "panoptic_val")),
         1, r"{tmp}/panoptic_val\.json.*segments_info", "error naming the file and the key"),
    Case("eval regions", "panoptic PNG disagrees with its json",
         lambda e: eval_argv(e, *copy_panoptic(e, lambda d, png: d["annotations"][0]["segments_info"][0].update(
             id=123456))[:1], panoptic_root=str(e.tmp / "panoptic_val")),
         1, r"{tmp}/panoptic_val\.json: image \S+ \(PNG \S+\.png\): PNG segment id\(s\) \[\d+\] \(\d+ pixels\) "
            r"are not in the json's segments_info", "error naming the json, the image, its PNG and the segment ids",
         check=_nothing_in("eval")),
    Case("eval regions", "panoptic PNG missing",
         lambda e: eval_argv(e, *copy_panoptic(e, lambda d, png: next(png.glob("*.png")).unlink())[:1],
                             panoptic_root=str(e.tmp / "panoptic_val")),
         1, r"{tmp}/panoptic_val/.*\.png", "error naming the file"),
    Case("eval regions", "model weights that are a pickle with code in it",
         lambda e: eval_argv(e, None, f"model.pretrained={e.evil_pickle()}"),
         1, r"{tmp}/evil\.pt", "refused, naming the file; the code never runs",
         check=lambda e: not (e.tmp / "pwned").exists() or pytest.fail("the pickle's code ran")),
    Case("eval regions", "unknown --set key",
         lambda e: eval_argv(e, None, "data.imgae_size=64"),
         2, r"unknown config key 'data\.imgae_size'.*did you mean 'image_size'", "config error naming the key"),
    Case("eval regions", "full disk while writing regions.json (simulated)",
         lambda e: eval_argv(e, None, "diagnostics=false"),
         1, r"cannot write {tmp}/out/eval/regions\.json", "error naming the file; no partial file",
         during=lambda e: disk_full_after(300), check=_nothing_in("eval")),
    # ---------------------------------------------------------------- eval semseg
    Case("eval semseg", "label folder missing",
         lambda e: semseg_argv(e, label_root=str(e.tmp / "no_labels")),
         1, r"{tmp}/no_labels", "error naming the folder", check=_nothing_in("semseg")),
    Case("eval semseg", "a label PNG of another size than its image",
         lambda e: (shutil.copytree(e.world / "annotations" / "semantic_val", e.tmp / "labels"),
                    Image.new("L", (10, 7)).save(sorted((e.tmp / "labels").glob("*.png"))[0]),
                    semseg_argv(e, label_root=str(e.tmp / "labels")))[-1],
         1, r"{tmp}/labels/\S+\.png.*(10x7|7x10|\(7, 10\))", "error naming the label file and both sizes"),
    Case("eval semseg", "unknown vocabulary",
         lambda e: semseg_argv(e, "text.vocabulary=voc_12"),
         1, r"voc_12.*voc_21", "error naming the value and the closest built-in vocabulary"),
    Case("eval semseg", "unknown inference.mode",
         lambda e: semseg_argv(e, "inference.mode=slidee"),
         2, r"inference\.mode.*'slidee'", "config error naming the key, the value and the choices"),
    Case("eval semseg", "model weights of another model",
         lambda e: semseg_argv(e, f"model.pretrained={e.weights(OTHER, 'other.safetensors')}"),
         1, r"{tmp}/other\.safetensors", "error naming the file and the mismatching tensors"),
    # ---------------------------------------------------------------- cache-teacher
    Case("cache-teacher", "a CLIPSelf recipe (no teacher to cache)",
         lambda e: cache_teacher_argv(e, "method=clipself"),
         2, r"{tmp}/train\.yaml: AlignConfig: teacher_cache: only method 'densevlm' reads a teacher cache, not "
            r"'clipself'", "config error naming the file, the key and the method",
         check=_nothing_in("teacher_cache")),
    Case("cache-teacher", "corrupt image in the folder",
         lambda e: (_bad_png(e, e.images(), "corrupt"), cache_teacher_argv(
             e, f"teacher.pretrained={e.weights(TINY, 'teacher.safetensors')}", images=e.tmp / "images"))[1],
         1, r"cannot read image {tmp}/images/bad_corrupt\.png", "error naming the file"),
    Case("cache-teacher", "teacher weights that are a pickle with code in it",
         lambda e: cache_teacher_argv(e, f"teacher.pretrained={e.evil_pickle()}"),
         1, r"{tmp}/evil\.pt", "refused, naming the file; the code never runs",
         check=lambda e: not (e.tmp / "pwned").exists() or pytest.fail("the pickle's code ran")),
    # ---------------------------------------------------------------- talk2dino
    Case("talk2dino train", "captions json missing",
         lambda e: talk2dino_argv(e, "train", captions=str(e.tmp / "gone.json"), image_root=e.images()),
         1, r"{tmp}/gone\.json", "error naming the file"),
    Case("talk2dino cache", "corrupt image",
         lambda e: (lambda folder: talk2dino_argv(
             e, "cache", image_root=folder,
             captions=e.captions(folder, ["000.png", Path(_bad_png(e, folder, "corrupt")).name])))(e.images()),
         1, r"cannot read image {tmp}/images/bad_corrupt\.png", "error naming the file; no half-made cache"),
    Case("talk2dino train", "unknown vision.family",
         lambda e: talk2dino_argv(e, "train", "vision.family=dino"),
         2, r"vision\.family.*'dino'", "config error naming the key, the value and the choices"),
    Case("talk2dino train", "output_dir holds a run of the user's (no --resume)",
         lambda e: (_own_run(e, "psi"), talk2dino_argv(e, "train"))[1],
         1, r"run directory {tmp}/out/psi already exists and is not empty",
         "refused before the cache is built, naming the folder; the folder is left untouched"),
    # ---------------------------------------------------------------- export
    Case("export", "--out exists (no --overwrite)",
         lambda e: (lambda argv: ((e.out / "export").mkdir(parents=True),
                                  (e.out / "export" / "model.safetensors").write_text("mine"), argv)[-1])(
             export_argv(e)),
         1, r"{tmp}/out/export/model\.safetensors already exist.*--overwrite", "refused naming the file; it is untouched"),
    Case("export", "weights file of another model than --name",
         lambda e: ["export", "--model", e.weights(OTHER, "other.safetensors"), "--name", TOY, "--format",
                    "open_clip", "--out", str(e.out / "export" / "m.safetensors")],
         1, r"{tmp}/other\.safetensors", "error naming the file and the mismatching tensors"),
    Case("export", "model that does not exist",
         lambda e: ["export", "--model", str(e.tmp / "runs" / "gone"), "--format", "open_clip", "--out",
                    str(e.out / "export" / "m.safetensors")],
         2, r"{tmp}/runs/gone", "error naming the path"),
    Case("export", "eva_reference layout of a non-EVA model",
         lambda e: export_argv(e, fmt="eva_reference"),
         1, r"eva_reference.*ToyCLIP-ViT-T-16|ToyCLIP-ViT-T-16.*eva_reference",
         "error naming the layout and the model"),
    Case("export", "full disk while writing (simulated)",
         lambda e: export_argv(e, "--no-verify"),
         1, r"cannot write {tmp}/out/export/model\.safetensors", "error naming the file; no partial file",
         during=lambda e: disk_full_after(100_000)),
    # ---------------------------------------------------------------- det (needs detectron2)
    Case("det train", "unknown --set key",
         lambda e: det_argv(e, "train", "solver.lrr=0.1"),
         2, r"unknown config key 'solver\.lrr'.*did you mean 'lr'", "config error naming the key path",
         needs="detectron2"),
    Case("det eval", "weights file missing",
         lambda e: det_argv(e, "eval", f"weights={e.tmp / 'model_final.pth'}"),
         1, r"{tmp}/model_final\.pth", "error naming the file", needs="detectron2"),
    Case("det train", "data.root missing",
         lambda e: det_argv(e, "train", f"data.root={e.tmp / 'no_world'}"),
         1, r"{tmp}/no_world", "error naming the folder", needs="detectron2"),
    # ---------------------------------------------------------------- labels, report, app
    Case("labels propose", "image source (toy world) missing",
         lambda e: ["labels", "propose", "--set", f"data.source.path={e.tmp / 'nowhere'}",
                    f"output_dir={e.out / 'labels'}"],
         1, r"no toy world at {tmp}/nowhere.*densevlm toyworld",
         "error naming the folder and the command that makes it; no output folder"),
    Case("labels apply", "--proposals folder holds no proposals",
         lambda e: ["labels", "apply", "--proposals", str(e.tmp / "noprop"), "--corrected",
                    _json_file(e, "corrected.json", "{}"), "--out", str(e.out / "corrections.json")],
         1, r"{tmp}/noprop", "error naming the folder; no corrections file"),
    Case("report", "labelled set's panoptic json missing",
         lambda e: ["report", "--set", "models=[base=toy-student]", f"data.panoptic_json={e.tmp / 'none.json'}",
                    f"data.image_root={e.tmp / 'images'}", f"output_dir={e.out / 'report'}"],
         1, r"{tmp}/none\.json", "error naming the file; no report folder"),
    Case("report", "no model to report on",
         lambda e: ["report", "--set", "models=[]", f"output_dir={e.out / 'report'}"],
         2, r"models: expected at least one", "config error naming the key and an example"),
    Case("app", "a model that does not exist",
         lambda e: ["app", "--set", f"models=[mine={e.tmp / 'runs' / 'gone'}]", f"output_dir={e.out / 'app'}"],
         2, r"{tmp}/runs/gone", "error naming the model, before the server or its example world is made"),
    # ---------------------------------------------------------------- shards, compare
    Case("shards", "write: image source missing",
         lambda e: ["shards", "write", "-c", "configs/train/densevlm_toy_shards.yaml", "--set",
                    f"data.source.path={e.tmp / 'nowhere.json'}", f"data.shards={e.out / 'shards'}"],
         1, r"{tmp}/nowhere\.json", "error naming the file; no shard folder"),
    Case("compare", "zero training seeds",
         lambda e: ["compare", "--set", "seeds=0", f"output_dir={e.out / 'compare'}"],
         2, r"seeds: expected .*>= 1, got 0", "config error naming the key and the value"),
    # ---------------------------------------------------------------- zoo build
    Case("zoo build", "--publish into a zoo that has the entries (no --overwrite)",
         lambda e: ["zoo", "build", "--root", str(e.out / "build"), "--publish", _zoo_entry(e)],
         1, r"{tmp}/published/manifest\.json.*toy-student.*--overwrite",
         "refused before anything runs (not hours later), naming the manifest and the entry"),
    Case("zoo build", "--publish into a folder with a malformed manifest",
         lambda e: ["zoo", "build", "--root", str(e.out / "build"), "--publish",
                    str(Path(_json_file(e, "manifest.json", "{")).parent)],
         1, r"{tmp}/manifest\.json: not valid JSON", "refused before anything runs, naming the file"),
    Case("zoo build", "--root is a file",
         lambda e: ["zoo", "build", "--root", _json_file(e, "root.txt", "x")],
         1, r"{tmp}/root\.txt", "error naming the path"),
    Case("zoo build", "--workers -1",
         lambda e: ["zoo", "build", "--root", str(e.out / "build"), "--workers", "-1"],
         2, r"--workers.*-1", "error naming the option and the value"),
    # ---------------------------------------------------------------- embed-text
    Case("embed-text", "vocabulary json is malformed",
         lambda e: embed_argv(e, vocabulary=_json_file(e, "v.json", '{"name": "x", "classes": [{"nam": "boat"}]}')),
         1, r"{tmp}/v\.json", "error naming the file and the entry"),
    Case("embed-text", "vocabulary with a duplicate name",
         lambda e: embed_argv(e, vocabulary=e.vocab(["boat", "boat", "sky"])),
         1, r"{tmp}/vocab\.json: vocabulary 'tiny': duplicate thing class name 'boat' \(classes 0 and 1\)",
         "error naming the file, the name and both positions"),
    Case("embed-text", "weights of another model",
         lambda e: embed_argv(e, "--weights", e.weights(OTHER, "other.safetensors")),
         1, r"{tmp}/other\.safetensors", "error naming the file and the mismatching tensors"),
    Case("embed-text", "weights file that is a pickle with code in it",
         lambda e: embed_argv(e, "--weights", e.evil_pickle()),
         1, r"{tmp}/evil\.pt", "refused, naming the file; the code never runs",
         check=lambda e: not (e.tmp / "pwned").exists() or pytest.fail("the pickle's code ran")),
    Case("embed-text", "full disk while writing --out (simulated)",
         lambda e: embed_argv(e, "--out", str(e.out / "emb.safetensors")),
         1, r"cannot write {tmp}/out/emb\.safetensors", "error naming the file; no partial file",
         during=lambda e: disk_full_after(100), check=_nothing_in("")),
    Case("embed-text", "unknown model name",
         lambda e: ["embed-text", "--model", "ToyCLIP-ViT-T-61", "--vocabulary", "voc_21"],
         2, r"model name 'ToyCLIP-ViT-T-61': no open_clip config or zoo model with that name.*ToyCLIP-ViT-T-16",
         "error suggesting the closest names"),
    Case("embed-text", "zoo model whose weights file is corrupted",
         lambda e: ["embed-text", "--model", "toy-tiny", "--vocabulary", "voc_21", "--templates", "single"],
         1, r"zoo model 'toy-tiny': weights file {tmp}/zoo/tiny\.safetensors is corrupted: sha256 [0-9a-f]{64}, "
            r"expected 0{64}", "error naming the file and both checksums", during=lambda e: zoo_env(e, corrupt=True)),
    # ---------------------------------------------------------------- zoo
    Case("zoo list", "malformed zoo manifest",
         lambda e: ["zoo", "list"],
         1, r"{tmp}/zoo/manifest\.json: model 'toy-tiny' lacks \['sha256'\]", "error naming the file and the entry",
         during=lambda e: zoo_env(e, drop="sha256")),
    # ---------------------------------------------------------------- demo
    Case("demo", "config with an unknown key deep inside",
         lambda e: ["demo", "--set", "densevlm.loop.epocs=1"],
         2, r"unknown config key 'densevlm\.loop\.epocs'.*did you mean 'epochs'", "config error naming the key path"),
]


ERROR_LINE = re.compile(r"densevlm [\w-]+: (?:config )?error: ")  # not anchored: a progress bar may precede it


def error_text(stderr: str) -> str:
    """The command's error (from its ``densevlm CMD: error:`` to the end of stderr); logged warnings and progress
    output before it are not part of it."""
    starts = [m.start() for m in ERROR_LINE.finditer(stderr)]
    return stderr[starts[-1]:] if starts else ""


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, world: Path, tmp_path: Path, capsys, caplog) -> None:
    if case.needs:
        pytest.importorskip(case.needs)
    env = Env(tmp_path, world)
    argv = case.argv(env)
    with caplog.at_level("WARNING"), case.during(env) if case.during else contextlib.nullcontext():
        before = snapshot(tmp_path)
        code = cli.main(argv)
        after = snapshot(tmp_path)
    captured = capsys.readouterr()
    seen = captured.err + captured.out + caplog.text
    assert code == case.code, seen[-3000:]
    pattern = case.message.replace("{tmp}", re.escape(str(tmp_path))).replace("{world}", re.escape(str(world)))
    if code == 0:  # a row that succeeds: its message is a warning or the result line
        assert re.search(pattern, seen), f"expected /{pattern}/ in:\n{seen[-3000:]}"
    else:
        error = error_text(captured.err)
        assert re.search(pattern, error), f"expected /{pattern}/ in the error line:\n{error[-2000:]}\n" \
                                          f"(all output:\n{seen[-2000:]})"
        changes = tree_changes(before, after, case.leaves)
        assert not changes, f"the failed command changed its folder: {changes[:20]}"
    if case.check is not None:
        case.check(env)


# --------------------------------------------------------------------------- reruns and file modes
def _pretrain_corrupt(env: Env) -> tuple[list[str], Path]:
    argv = _pretrain_bad_image("corrupt")(env)
    return argv, env.tmp / "images" / "bad_corrupt.png"


def _train_corrupt(env: Env) -> tuple[list[str], Path]:
    folder = env.images()
    return train_argv(env, images=folder), Path(_bad_png(env, folder, "corrupt"))


@pytest.mark.parametrize("make", [_train_corrupt, _pretrain_corrupt], ids=["train", "pretrain"])
def test_rerun_after_a_failed_run_just_works(make, world, tmp_path, capsys):
    """A run that fails on bad data (here in its first step) leaves no run directory; the same command, once the
    data is fixed, succeeds into the same output_dir. A run directory of the user's is still refused."""
    env = Env(tmp_path, world)
    argv, bad = make(env)
    assert cli.main(argv) == 1
    assert "cannot read image" in capsys.readouterr().err
    assert not env.out.exists(), sorted(env.out.rglob("*"))
    shutil.copy(bad.parent / "000.png", bad)  # the fix: a good image under the bad one's name
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    run = env.out / "run"
    assert (run / "weights.safetensors").is_file() and (run / "config.yaml").is_file()
    before = snapshot(run)
    assert cli.main(argv) == 1  # now it is a finished run: refused, and left as it was
    assert "already exists" in capsys.readouterr().err and snapshot(run) == before


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_data_and_models_are_read_before_the_run_directory_exists(command, world, tmp_path, monkeypatch):
    """The order, not only the clean-up: bad data must fail before output_dir (config.yaml) is written."""
    from densevlm.tasks import align, pretrain

    env = Env(tmp_path, world)
    seen: list[bool] = []
    if command == "pretrain":
        argv = _pretrain_bad_image("corrupt")(env)
        real = pretrain.CaptionDataset

        def spy(*args, **kwargs):
            seen.append((env.out / "run").exists())
            raise ValueError("stop here")
        monkeypatch.setattr(pretrain, "CaptionDataset", spy)
    else:
        argv = train_argv(env)
        real = align.METHODS["densevlm"]

        def spy(*args, **kwargs):
            seen.append((env.out / "run").exists())
            raise ValueError("stop here")
        monkeypatch.setitem(align.METHODS, "densevlm", spy)
    assert real is not None and cli.main(argv) == 1
    assert seen == [False]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_outputs_get_the_umask_mode(umask, tmp_path):
    """tempfile makes 0600 files and 0700 folders; outputs must get what open()/mkdir() give under the umask."""
    from safetensors.torch import save_file

    from densevlm.utils.io import atomic_dir, atomic_save, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a" / "x.json", "{}")
        atomic_save(tmp_path / "w.safetensors", lambda p: save_file({"t": torch.zeros(2)}, str(p)))
        with atomic_dir(tmp_path / "folder") as staging:
            (staging / "inside.txt").write_text("x")
        (tmp_path / "plain.txt").write_text("x")  # the oracle: an ordinary write under the same umask
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777
    assert mode("plain.txt") == 0o666 & ~umask and mode("plain_dir") == 0o777 & ~umask
    assert mode("a/x.json") == mode("w.safetensors") == mode("plain.txt")
    assert mode("folder") == mode("plain_dir")


def test_export_files_are_readable_by_the_group_under_umask_022(world, tmp_path, capsys):
    """End to end: `densevlm export` (open_clip: weights + config JSON) under the usual umask gives 0644 files."""
    env = Env(tmp_path, world)
    argv = export_argv(env, "--no-verify")
    old = os.umask(0o022)
    try:
        assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    finally:
        os.umask(old)
    files = [p for p in (env.out / "export").rglob("*") if p.is_file()]
    assert len(files) >= 2 and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}, files


def test_odd_image_modes_become_proper_8bit_rgb(tmp_path):
    """16-bit and other modes are scaled, not clipped: PIL's convert("RGB") turns a 16-bit ramp almost white."""
    from densevlm.data.images import load_rgb

    ramp = np.linspace(0, 1, 256).reshape(1, 256).repeat(4, 0)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "sixteen.png")
    Image.fromarray((ramp * 255).astype(np.uint8), "L").convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    for name in ("sixteen.png", "cmyk.jpg"):
        img = load_rgb(tmp_path / name)
        a = np.asarray(img).astype(int)
        assert img.mode == "RGB" and a.shape == (4, 256, 3), name
        assert abs(a[0, :, 0] - np.round(ramp[0] * 255)).max() <= 3, name  # the ramp survives, end to end
    with Image.open(tmp_path / "sixteen.png") as raw:
        assert np.asarray(raw.convert("RGB"))[0, 128, 0] == 255  # what we avoid: PIL clips 16-bit values


def markdown_table(cases: list[Case] = CASES) -> str:
    """The README's "Failure behaviour" table: one row per case."""
    rows = ["| command | bad input | exit | behaviour |", "| --- | --- | --- | --- |"]
    rows += [f"| `{c.command}` | {c.bad_input} | {c.code} | {c.behaviour} |" for c in cases]
    return "\n".join(rows)


def test_readme_failure_table_is_this_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it: python tests/test_bad_inputs.py"


def test_every_command_has_bad_input_rows():
    """The table claims every command: each (sub)command of the parser that does work has at least one row."""
    from densevlm.cli.main import build_parser

    def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[str]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [" ".join(path)]
        found = [" ".join(path)] if parser.get_default("fn") is not None and path else []
        return found + [leaf for name, sub in subs[0].choices.items() for leaf in leaves(sub, (*path, name))]

    commands = set(leaves(build_parser()))
    covered = {c.command for c in CASES}
    # the demo's other tasks run the same stages as `demo` (its row checks their shared config)
    missing = sorted(c for c in commands - covered if not c.startswith("demo "))
    assert not missing, f"commands without a bad-input row: {missing}"


if __name__ == "__main__":
    print(markdown_table())
