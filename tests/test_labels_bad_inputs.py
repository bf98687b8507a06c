"""Bad inputs of region sources, ``labels propose|apply`` and training on corrections: a clear error naming the
file and the id, a non-zero exit code, and nothing half-written (the output tree exactly as before the command,
or for ``train`` a run folder without weights, metrics or temporary files).

Kept apart from tests/test_bad_inputs.py (same shape: one row per bad input, the real command line in-process).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import yaml

from densevlm import cli
from densevlm.config.toyworld import ToyWorldConfig

TINY = {"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}, "text_cfg": {"layers": 1, "width": 32, "heads": 1}}
TOY = "ToyCLIP-ViT-T-16"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny toy world and a tiny random teacher's proposals for its instance boxes (shared read-only)."""
    from densevlm.toyworld import generate_world

    tmp = tmp_path_factory.mktemp("labels_bad")
    root = tmp / "world"
    generate_world(ToyWorldConfig(num_train=4, num_val=2, image_size=64, workers=0), root, progress=False)
    recipe = tmp / "propose.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp / "props"), "teacher": {"name": TOY, "model_overrides": TINY},
        "teacher_text": {"vocabulary": str(root), "templates": "single"},
        "data": {"source": {"kind": "toyworld", "path": str(root)}, "image_size": 64,
                 "regions": {"kind": "boxes", "path": str(root / "annotations" / "instances_train.json")}}}))
    assert cli.main(["labels", "propose", "-c", str(recipe)]) == 0
    return {"root": root, "recipe": recipe, "props": tmp / "props"}


@dataclass
class Env:
    tmp: Path
    world: dict

    @property
    def root(self) -> Path:
        return self.world["root"]

    def instances(self) -> dict:
        return json.loads((self.root / "annotations" / "instances_train.json").read_text())

    def write(self, name: str, data) -> str:
        path = self.tmp / name
        path.write_text(json.dumps(data) if not name.endswith(".yaml") else yaml.safe_dump(data))
        return str(path)

    def propose(self, kind: str, regions: str) -> list[str]:
        return ["labels", "propose", "-c", str(self.world["recipe"]), "--set", f"output_dir={self.tmp / 'out'}",
                f"data.regions.kind={kind}", f"data.regions.path={regions}"]

    def train_recipe(self, **top) -> str:
        base = {"output_dir": str(self.tmp / "out"), "method": "densevlm",
                "student": {"name": TOY, "model_overrides": TINY}, "teacher": {"name": TOY, "model_overrides": TINY},
                "student_text": {"vocabulary": str(self.root), "templates": "single"},
                "teacher_text": {"vocabulary": str(self.root), "templates": "single"}, "exclude_novel": True,
                "ensemble_alpha": None,
                "data": {"source": {"kind": "toyworld", "path": str(self.root)}, "image_size": 64},
                "loop": {"epochs": 1, "max_steps": 1, "batch_size": 4, "num_workers": 0, "cpu": True,
                         "eval_every": 0}}
        return self.write("train.yaml", {**base, **top})


# --------------------------------------------------------------------------- rows
def _unknown_image(env: Env) -> list[str]:
    data = env.instances()
    data["images"].append({"id": 999, "file_name": "not_there.jpg", "width": 64, "height": 64})
    return env.propose("boxes", env.write("props.json", data))


def _unknown_image_id(env: Env) -> list[str]:
    results = [{"image_id": 4242, "bbox": [1, 1, 5, 5], "score": 0.5, "category_id": 1}]
    return env.propose("boxes", env.write("results.json", results))


def _box_outside(env: Env) -> list[str]:
    data = env.instances()
    data["annotations"][0]["id"] = 31337
    data["annotations"][0]["bbox"] = [50.0, 10.0, 30.0, 8.0]  # x1 = 80 on a 64-px image
    return env.propose("boxes", env.write("props.json", data))


def _empty_mask(env: Env) -> list[str]:
    data = env.instances()
    rle = mask_utils.encode(np.zeros((64, 64), dtype=np.uint8, order="F"))
    data["annotations"][1]["id"] = 4711
    data["annotations"][1]["segmentation"] = {"size": [64, 64], "counts": rle["counts"].decode("ascii")}
    return env.propose("masks", env.write("masks.json", data))


def _corrected(env: Env, rename: str) -> str:
    data = json.loads((env.world["props"] / "proposals.coco.json").read_text())
    data["categories"].append({"id": 9001, "name": rename})
    data["annotations"][0]["category_id"] = 9001
    data["annotations"][0]["id"] = 777
    return env.write("corrected.json", data)


def _class_outside_vocabulary(env: Env) -> list[str]:
    return ["labels", "apply", "--proposals", str(env.world["props"]), "--corrected",
            _corrected(env, "unicorn"), "--out", str(env.tmp / "out" / "corr.json")]


def _rule_outside_vocabulary(env: Env) -> list[str]:
    rules = env.write("rules.yaml", {"merge": {"car": "lorry"}})
    return ["labels", "apply", "--proposals", str(env.world["props"]), "--corrected", _corrected(env, "car"),
            "--rules", rules, "--out", str(env.tmp / "out" / "corr.json")]


def _corrections_for_another_source(env: Env) -> list[str]:
    corr = env.tmp / "corr.json"
    assert cli.main(["labels", "apply", "--proposals", str(env.world["props"]), "--corrected",
                     _corrected(env, "car"), "--out", str(corr)]) == 0
    # The corrections were made on instance boxes; this run trains on the grid.
    return ["train", "-c", env.train_recipe(teacher_targets={"corrections": str(corr)})]


def _cache_for_another_source(env: Env) -> list[str]:
    from densevlm.config import from_dict
    from densevlm.config.align import AlignConfig
    from densevlm.data.teacher_cache import write_manifest
    from densevlm.models import create_backbone
    from densevlm.tasks.teacher_cache import recipe_cache_metadata

    zoo_teacher = {"name": "toy-teacher-clipself"}  # a cache's teacher needs weights with an identity
    grid = from_dict(AlignConfig, yaml.safe_load(Path(env.train_recipe(teacher=zoo_teacher)).read_text()))
    student = create_backbone(grid.student)
    write_manifest(env.tmp / "cache", recipe_cache_metadata(grid, student.image_mean, student.image_std), 128, 4, 4)
    data = yaml.safe_load(Path(env.train_recipe(teacher=zoo_teacher)).read_text())
    data["data"]["regions"] = {"kind": "boxes", "path": str(env.root / "annotations" / "instances_train.json")}
    data["teacher_cache"] = str(env.tmp / "cache")
    return ["train", "-c", env.write("boxes.yaml", data)]


@dataclass
class Case:
    what: str
    argv: Callable[[Env], list[str]]
    message: str  # a regex; {tmp} and {world} are the row's folder and the world
    train: bool = False  # train writes its run folder's config first: checked for no weights/metrics instead


CASES = [
    Case("proposals file for an image the source lacks", _unknown_image,
         r"{tmp}/props\.json: images entry 999: image 'not_there\.jpg' is not in the image source"),
    Case("results list for an image id the source lacks", _unknown_image_id,
         r"{tmp}/results\.json: result 0: image_id 4242 is not in the image source"),
    Case("box outside its image", _box_outside,
         r"{tmp}/props\.json: annotation 31337: box \[x0, y0, x1, y1\] = \[50\.0, 10\.0, 80\.0, 18\.0\] lies "
         r"outside its 64x64 image"),
    Case("empty mask", _empty_mask, r"{tmp}/masks\.json: annotation 4711: empty mask"),
    Case("correction naming a class outside the vocabulary", _class_outside_vocabulary,
         r"{tmp}/corrected\.json: annotation 777 \(image \S+\): class 'unicorn' is not in the vocabulary"),
    Case("class rule naming a class outside the vocabulary", _rule_outside_vocabulary,
         r"{tmp}/rules\.yaml: merge names class 'lorry', which is not in the vocabulary"),
    Case("corrections file for another region source", _corrections_for_another_source,
         r"corrections file {tmp}/corr\.json was made for another source than this run's: regions: the file's "
         r"boxes:{world}/annotations/instances_train\.json .*, the run's grid \(densevlm, max_split 6\)", train=True),
    Case("teacher cache built for another region source", _cache_for_another_source,
         r"teacher cache {tmp}/cache was built for other settings than this run's: .*regions: cache has "
         r"\{\"kind\": \"grid\".*the run needs \{\"kind\": \"boxes\"", train=True),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.what.replace(" ", "-"))
def test_bad_labels_input(case: Case, world: dict, tmp_path: Path, capsys) -> None:
    env = Env(tmp_path, world)
    argv = case.argv(env)
    capsys.readouterr()
    before = _tree(tmp_path)
    code = cli.main(argv)
    output = capsys.readouterr().err
    assert code == 1, output[-2000:]
    pattern = case.message.replace("{tmp}", re.escape(str(tmp_path))).replace("{world}", re.escape(str(world["root"])))
    assert re.search(pattern, output), f"expected /{pattern}/ in:\n{output[-2000:]}"
    after = _tree(tmp_path)
    if case.train:
        new = set(after) - set(before)
        assert not [p for p in new if not p.startswith("out/") or p.endswith((".safetensors", "metrics.json"))
                    or ".tmp" in p or ".partial" in p], sorted(new)
        assert {k: v for k, v in after.items() if k in before} == before
    else:
        assert after == before  # nothing written, nothing touched
