"""Config of ``densevlm demo labels``: the toy end-to-end story of reviewed teacher labels (section ``labels`` of
the demo profile)."""

from __future__ import annotations

from dataclasses import dataclass, field

from densevlm.config.core import ConfigError
from densevlm.config.semseg import SemSegInferenceConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.config.train import LoopConfig, OptimConfig

#: Toy-world classes renamed to the words of a made-up inspection domain: words the toy CLIPs never read.
DOMAIN_WORDS = {"kite": "sprocket", "balloon": "gasket", "umbrella": "rivet", "snow": "weld seam"}


def _story_world() -> ToyWorldConfig:
    return ToyWorldConfig(num_train=100, num_val=60, image_size=128, workers=0, seed=7)


@dataclass
class DemoLabelsConfig:
    """A "domain" made from the toy world (``renames``: toy class -> domain word, flagged novel in the domain's
    vocabulary), ``images`` unlabelled training images whose regions come from a class-agnostic mask file (the
    world's segments without their classes, standing in for a mask generator's output), the teacher's labels
    proposed for them, a *simulated* reviewer who corrects the wrong labels of the first ``reviewed_images`` from
    the ground truth, DenseVLM tuned with and without the corrections (and CLIPSelf, the baseline), and the report
    on the world's val split (``report_images`` of them).

    ``loop`` / ``optim`` / ``image_size`` / ``max_boxes``: the tuning runs, shared by all three (128-px images and
    two epochs: sized to finish in minutes on two CPU cores);
    ``inference``: the report's segmentation.
    """

    world: ToyWorldConfig = field(default_factory=_story_world)
    renames: dict[str, str] = field(default_factory=lambda: dict(DOMAIN_WORDS))
    images: int = 100
    reviewed_images: int = 20
    image_size: int = 128
    max_boxes: int = 12
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=2, batch_size=16, num_workers=0,
                                                                log_every=10, eval_every=0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=4))
    report_images: int = 60
    inference: SemSegInferenceConfig = field(default_factory=lambda: SemSegInferenceConfig(
        short_side=128, max_long_side=None, mode="whole", batch_size=16))

    def validate(self) -> None:
        if self.images < 1 or not 0 <= self.reviewed_images <= self.images:
            raise ConfigError(f"labels: need images >= 1 and 0 <= reviewed_images <= images, got images={self.images}, "
                              f"reviewed_images={self.reviewed_images}")
        if self.images > self.world.num_train:
            raise ConfigError(f"labels.images: {self.images} training images asked, the world has "
                              f"world.num_train={self.world.num_train}")
        words = list(self.renames.values())
        if len(set(words)) != len(words) or any(not w.strip() or "," in w for w in words):
            raise ConfigError(f"labels.renames: domain words must be distinct non-empty names without commas, got "
                              f"{words}")
