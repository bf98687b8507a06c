"""The segmenter registry, the one inference loop and the device helper (issue 19, deliverable 3)."""

import pytest
import torch

from densevlm.config.core import ConfigError
from densevlm.evaluation.inference import inference_on_dataset
from densevlm.segmenters import SEGMENTERS, DenseCLIPSegmenter, Talk2DINOSegmenter, get_segmenter, register_segmenter
from densevlm.utils.device import module_device, resolve_device


def test_the_config_names_resolve_to_their_classes_and_an_unknown_name_lists_the_known():
    assert get_segmenter("dense_clip") is DenseCLIPSegmenter and get_segmenter("talk2dino") is Talk2DINOSegmenter
    with pytest.raises(ConfigError, match=r"unknown segmenter 'nope'; known: \['dense_clip', 'talk2dino'\]"):
        get_segmenter("nope")
    with pytest.raises(ValueError, match="already registered as DenseCLIPSegmenter"):
        register_segmenter("dense_clip")(Talk2DINOSegmenter)
    assert set(SEGMENTERS) == {"dense_clip", "talk2dino"}


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = [("init",)]

    def reset(self) -> None:
        self.calls.append(("reset",))

    def process(self, inputs, outputs) -> None:
        self.calls.append(("process", inputs, outputs))

    def evaluate(self):
        return self.calls


def test_inference_on_dataset_resets_feeds_every_batch_and_stops_at_max_batches():
    evaluator = _Recorder()
    timing = inference_on_dataset(lambda batch: [2 * x for x in batch], [[1, 2], [3], [4, 5]], evaluator,
                                  total=5, desc="test", progress=False)
    assert evaluator.calls == [("init",), ("reset",), ("process", [1, 2], [2, 4]), ("process", [3], [6]),
                               ("process", [4, 5], [8, 10])]
    assert timing["images"] == 5 and timing["total"] >= timing["data"] + timing["model"] >= 0
    timing = inference_on_dataset(lambda batch: batch, [[1, 2], [3], [4, 5]], evaluator, total=3, desc="test",
                                  progress=False, max_batches=1, batch_images=lambda batch: 10 * len(batch))
    assert evaluator.calls[-2:] == [("reset",), ("process", [1, 2], [1, 2])] and timing["images"] == 20


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")
