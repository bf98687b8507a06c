"""Shards (densevlm/data/shards.py, stream.py, tasks/shards.py): write, read back, exactly once over ranks x workers
x epochs, mid-epoch resume, and the bad inputs (each a clear error naming the shard, nothing half-written)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from densevlm.config import from_dict
from densevlm.config.align import AlignConfig
from densevlm.data import shards as shards_mod
from densevlm.data.shards import ShardError, open_shards, read_shard
from densevlm.data.stream import ShardStream
from densevlm.tasks.shards import write_shards


class ToyPayload:
    """Per-image arrays whose values are a function of the index (so a reader can check them independently)."""

    name = "toy"

    def __init__(self, vocabulary: str = "v1") -> None:
        self.identity = {"vocabulary": vocabulary, "k": 2}

    def arrays(self, images, indices):
        return [{"ids": np.array([[i, i + 1]], dtype=np.int16), "probs": np.full((1, 2), i / 100, np.float16)}
                for i in indices]

    def item_fields(self, arrays, cells):
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


@pytest.fixture(autouse=True)
def toy_payload(monkeypatch):
    monkeypatch.setitem(shards_mod.PAYLOADS, "toy", lambda cfg, student: ToyPayload())


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8 + i % 3, 10, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


def shard_cfg(tmp: Path, n: int = 24, shard_size: int = 4, payload: str = "toy", **data) -> AlignConfig:
    if not (tmp / "img").is_dir():
        make_images(tmp / "img", n)
    return from_dict(AlignConfig, {"data": {"source": {"kind": "folder", "path": str(tmp / "img")},
                                            "shards": str(tmp / "shards"), "shard_size": shard_size,
                                            "shard_payload": payload, **data}})


def index_of(sample: dict) -> dict:
    return {"index": sample["index"]}


def test_write_round_trip_manifest_and_resume(tmp_path):
    cfg = shard_cfg(tmp_path, n=10, shard_size=4)
    first = write_shards(cfg, workers=2)
    assert (first["shards"], first["written_now"], first["count"]) == (3, 3, 10)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    for x in manifest["shards"]:  # the sha256 recorded is the file's (hashlib here, independent of the writer)
        assert x["sha256"] == hashlib.sha256((tmp_path / "shards" / x["name"]).read_bytes()).hexdigest()
    assert [x["count"] for x in manifest["shards"]] == [4, 4, 2]
    ss = open_shards(str(tmp_path / "shards"))
    got = [s for k in range(3) for s in read_shard(ss, k)]
    assert [s["index"] for s in got] == list(range(10))
    for s in got:  # images bit-identical to the source files; payload as written
        src = np.asarray(Image.open(tmp_path / "img" / f"{s['index']:04d}.png").convert("RGB"))
        assert np.array_equal(np.asarray(s["image"]), src)
        assert s["payload"]["ids"].tolist() == [[s["index"], s["index"] + 1]]
    # Resumable: a shard whose sidecar is gone is written again, the others are kept.
    (tmp_path / "shards" / "shard-000001.json").unlink()
    again = write_shards(cfg)
    assert (again["written_now"], again["already_done"]) == (1, 2)
    # Parallel over machines: each part writes its own shards; the last to finish writes the manifest.
    cfg2 = shard_cfg(tmp_path, n=10, shard_size=4)
    cfg2.data.shards = str(tmp_path / "parts")
    a = write_shards(cfg2, part=0, parts=2)
    assert a["written_now"] == 2 and a["manifest"] is None
    b = write_shards(cfg2, part=1, parts=2)
    assert b["written_now"] == 1 and b["count"] == 10


def read_all(stream: ShardStream, workers: int) -> list[list[int]]:
    """This rank's batches (index lists) in the order the loader gives them."""
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [b["index"].tolist() for b in loader]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1), (4, 3)])
def test_exactly_once_over_ranks_workers_and_epochs(tmp_path, world, workers):
    n, batch = 48, 2
    write_shards(shard_cfg(tmp_path, n=n, shard_size=4))
    ss = open_shards(str(tmp_path / "shards"))
    orders = []
    for epoch in range(2):
        seen: list[int] = []
        lengths = set()
        for rank in range(world):
            stream = ShardStream(ss, index_of, seed=3)
            assert stream.configure(rank=rank, world_size=world, batch_size=batch, num_workers=workers) == len(stream)
            stream.set_position(epoch, 0)
            batches = read_all(stream, workers)
            lengths.add(len(batches))
            assert all(len(b) == batch for b in batches)
            seen += [i for b in batches for i in b]
            if world * max(1, workers) == 4:  # 12 shards: whole shards per (rank, worker), none shared
                for w in range(max(1, workers)):
                    plan = stream.plan(w)
                    assert all(first == 0 and take == 4 for _, first, take in plan)
        assert len(lengths) == 1, "ranks must yield the same number of batches"
        assert sorted(seen) == list(range(n)), f"epoch {epoch}: every sample exactly once"
        orders.append(seen)
    assert orders[0] != orders[1], "the shard order is reshuffled each epoch"


@pytest.mark.parametrize("workers", [0, 3])
def test_mid_epoch_resume_continues_with_the_same_batches(tmp_path, workers):
    write_shards(shard_cfg(tmp_path, n=30, shard_size=4))  # shards of 4, 4, ..., 2: boundaries inside shards
    ss = open_shards(str(tmp_path / "shards"))
    stream = ShardStream(ss, index_of, seed=1)
    stream.configure(rank=1, world_size=2, batch_size=3, num_workers=workers)
    stream.set_position(1, 0)
    full = read_all(stream, workers)
    assert len(full) == 5
    for done in range(len(full) + 1):
        stream.set_position(1, done)
        assert read_all(stream, workers) == full[done:], f"resumed after {done} batch(es)"


# ------------------------------------------------------------------------------------------- bad inputs
def test_damaged_and_truncated_shards_are_named_or_skipped_with_a_count(tmp_path, caplog):
    write_shards(shard_cfg(tmp_path, n=12, shard_size=4))
    path = tmp_path / "shards" / "shard-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    ss = open_shards(str(tmp_path / "shards"))
    with pytest.raises(ShardError, match=r"shard-000001\.tar"):
        list(read_shard(ss, 1))
    stream = ShardStream(ss, index_of, shuffle=False)
    stream.configure(rank=0, world_size=1, batch_size=4, num_workers=0)
    stream.set_position(0, 0)
    with pytest.raises(ShardError, match=r"shard-000001\.tar"):
        read_all(stream, 0)
    skipping = ShardStream(ss, index_of, shuffle=False, skip_bad_shards=True)
    skipping.configure(rank=0, world_size=1, batch_size=4, num_workers=0)
    skipping.set_position(0, 0)
    with caplog.at_level("WARNING"):
        batches = read_all(skipping, 0)
    assert len(batches) == 3, "a rank still yields its batches (the damaged shard's samples replaced)"
    assert {4, 5, 6, 7}.isdisjoint({i for b in batches for i in b} - {4, 5})  # only what was read before damage
    assert "shard-000001.tar" in caplog.text and "1 bad shard" in caplog.text


def test_corrupt_bytes_and_a_manifest_sha256_that_disagrees(tmp_path):
    write_shards(shard_cfg(tmp_path, n=8, shard_size=4))
    manifest_path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    ss = open_shards(str(tmp_path / "shards"))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sha256 .* disagrees with manifest\.json"):
        list(read_shard(ss, 0))
    # A byte flipped inside an image: the tar still parses, the checksum catches it.
    path = tmp_path / "shards" / "shard-000001.tar"
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    raw = bytearray(path.read_bytes())
    raw[member.offset_data + member.size - 20] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"shard-000001\.tar"):
        list(read_shard(ss, 1))


def test_shards_for_another_vocabulary_are_refused_naming_it(tmp_path):
    cfg = shard_cfg(tmp_path, n=8)
    write_shards(cfg)
    ss = open_shards(str(tmp_path / "shards"))
    with pytest.raises(ShardError, match=r'vocabulary: shards have "v1", the run has "lvis"'):
        ss.check_payload("toy", ToyPayload("lvis").identity)
    with pytest.raises(ShardError, match=r"payload is 'toy', this run expects 'none'"):
        ss.check_payload("none", {})


def test_a_failed_write_leaves_no_shard_and_no_manifest(tmp_path):
    cfg = shard_cfg(tmp_path, n=8, shard_size=4)
    (tmp_path / "img" / "0005.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"0005\.png"):
        write_shards(cfg)
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert "manifest.json" not in names and "shard-000001.tar" not in names
    assert not [p for p in names if p.endswith(".tmp")]
    # Another source into the same folder is refused (a resumed write never mixes two sources).
    other = shard_cfg(tmp_path, n=8, shard_size=2)
    with pytest.raises(ShardError, match=r"shard_size"):
        write_shards(other)


def test_a_node_in_a_world_of_another_size_is_refused(tmp_path):
    from densevlm.config.train import LoopConfig, OptimConfig
    from densevlm.engine.trainer import Trainer

    trainer = Trainer(model=torch.nn.Linear(2, 1), objective=None, dataset=list(range(4)),
                      loop=LoopConfig(cpu=True, world_size=4, num_workers=0), optim=OptimConfig(),
                      run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"loop.world_size: the recipe expects 4 processes.*world of 1"):
        trainer.fit()


def test_densevlm_trains_from_shards(tmp_path):
    """`train` with data.shards streams them: the steps of one epoch are the shards' images over the batch."""
    from test_align import _tiny_cfg, _write_world

    from densevlm.tasks.align import run_align

    paths = _write_world(tmp_path, n_images=8)
    raw = _tiny_cfg(tmp_path, paths)
    raw["data"].update(shards=str(tmp_path / "shards"), shard_size=3)
    raw["loop"].update(epochs=1)
    cfg = from_dict(AlignConfig, raw)
    assert write_shards(cfg)["count"] == 8
    result = run_align(cfg)
    assert result.global_step == 4


@pytest.fixture(scope="module")
def compact_world(tmp_path_factory):
    """A tiny world, its compact target store (k=2 of 3 classes) and shards written from it with the payload."""
    from test_teacher_cache import _world

    from densevlm.tasks.teacher_cache import run_cache_teacher

    tmp = tmp_path_factory.mktemp("compact_shards")
    base = _world(tmp, n_images=6)
    base.update(teacher_cache=str(tmp / "store"), teacher_targets={"kind": "compact", "k": 2})
    base["data"].update(shards=str(tmp / "shards"), shard_size=4, shard_payload="compact")
    run_cache_teacher(from_dict(AlignConfig, base), progress=False)
    assert write_shards(from_dict(AlignConfig, base))["count"] == 6
    return base


def test_compact_targets_streamed_from_shards_equal_the_store(compact_world):
    """Every streamed item (image, boxes, cells, top-k ids / probs / tail) equals the item the map-style dataset
    gives for that image from the compact store itself."""
    from densevlm.data.sources import ImageSource
    from densevlm.models import create_backbone
    from densevlm.tasks.methods import grid_dataset
    from densevlm.tasks.shards import shard_dataset
    from densevlm.tasks.teacher_cache import open_teacher_cache

    cfg = from_dict(AlignConfig, compact_world)
    student = create_backbone(cfg.student)
    stream = shard_dataset(cfg, student, default_max_boxes=8)
    stream.configure(rank=0, world_size=1, batch_size=2, num_workers=0)
    stream.set_position(1, 0)
    source = ImageSource(cfg.data.source)
    mapped = grid_dataset(cfg, source, student, default_max_boxes=8,
                          teacher_cache=open_teacher_cache(cfg, source, student))
    mapped.set_epoch(1)
    seen = []
    for batch in stream:
        for j, index in enumerate(batch["index"].tolist()):
            ref = mapped[index]
            for key in ("image", "boxes", "valid", "cells", "teacher_topk_ids", "teacher_topk_probs",
                        "teacher_tail"):
                assert torch.equal(batch[key][j], ref[key]), (index, key)
            seen.append(index)
    assert sorted(seen) == list(range(6))


def test_densevlm_trains_on_compact_shards_and_refuses_another_k(compact_world):
    from densevlm.tasks.align import run_align

    result = run_align(from_dict(AlignConfig, compact_world))
    assert result.global_step == 6 // 4
    other = {**compact_world, "teacher_targets": {"kind": "compact", "k": 3},
             "output_dir": compact_world["output_dir"] + "_k3"}
    with pytest.raises(ShardError, match=r"k: shards have 2, the run has 3"):
        run_align(from_dict(AlignConfig, other))


def test_a_shard_cut_between_samples_is_named_with_its_count(tmp_path):
    """Cut at a sample boundary the tar still parses: the count against the manifest names what is missing."""
    write_shards(shard_cfg(tmp_path, n=8, shard_size=4))
    path = tmp_path / "shards" / "shard-000000.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third = next(m for m in members if m.name.startswith("000000002."))  # the first file of the third sample
    path.write_bytes(path.read_bytes()[:third.offset])
    with pytest.raises(ShardError, match=r"shard-000000\.tar holds 2 sample\(s\), manifest\.json says 4"):
        list(read_shard(open_shards(str(tmp_path / "shards")), 0))


class _Interrupt(Exception):
    pass


def _train_on_shards(shards: Path, run_dir: Path, resume: bool = False, stop_at: int = 0) -> dict:
    """tests/shards_worker.py's model on one process with 2 loader workers; ``stop_at``: die after that step."""
    from shards_worker import MSE, Net, to_item

    from densevlm.config.train import LoopConfig, OptimConfig
    from densevlm.engine.run_dir import prepare_run_dir
    from densevlm.engine.trainer import Trainer
    from safetensors.torch import load_file

    loop = LoopConfig(epochs=2, batch_size=2, num_workers=2, cpu=True, log_every=1, checkpoint_every_steps=2,
                      keep_checkpoints=2, handle_signals=False)
    optim = OptimConfig(lr=1e-2, warmup_steps=1)
    prepare_run_dir(run_dir, {"loop": loop.__dict__}, resume=resume)
    torch.manual_seed(0)
    ids: list = []

    def on_step(step, model):
        if step == stop_at:
            raise _Interrupt

    trainer = Trainer(model=Net(), objective=MSE(ids), dataset=ShardStream(open_shards(str(shards)), to_item, seed=5),
                      loop=loop, optim=optim, run_dir=run_dir, on_step=on_step)
    try:
        trainer.fit(resume=resume)
    except _Interrupt:
        return {"ids": ids}
    return {"ids": ids, "weights": load_file(str(run_dir / "weights.safetensors"))}


def test_the_trainer_resumes_a_streamed_epoch_at_its_shard_and_sample(tmp_path):
    """Killed after step 5 of 6 per epoch (last checkpoint: step 4), resumed: the same batches from there and
    bit-identical weights."""
    write_shards(shard_cfg(tmp_path, n=12, shard_size=3))
    full = _train_on_shards(tmp_path / "shards", tmp_path / "full")
    assert len(full["ids"]) == 12 and sorted(i for b in full["ids"][:6] for i in b) == list(range(12))
    _train_on_shards(tmp_path / "shards", tmp_path / "part", stop_at=5)
    resumed = _train_on_shards(tmp_path / "shards", tmp_path / "part", resume=True)
    assert resumed["ids"] == full["ids"][4:]
    assert all(torch.equal(full["weights"][k], resumed["weights"][k]) for k in full["weights"])
