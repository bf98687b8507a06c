"""CUDA: the dense path, one training step, bf16/fp16 training, the teacher cache, preemption, torch.compile and
two processes sharing one GPU, each checked against the CPU (or the uninterrupted / eager run).

Every test is marked ``cuda`` (see tests/conftest.py): on a CUDA GPU it runs there, without one it is skipped, and
with ``DENSEVLM_CUDA_TESTS_ON=cpu`` (``tools/gpu_check.sh --dry-run``, CI) it runs on the CPU: the "GPU against CPU"
comparisons then compare the CPU with itself, but every line runs. The models are the toy CLIPs with 2-block towers
(and EVA02-Ti for the dense path), so the file takes about a minute either way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml
from safetensors.torch import load_file

from densevlm.config import from_dict
from densevlm.config.align import AlignConfig

pytestmark = pytest.mark.cuda

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one device per process (``PartialState``): a CPU state left by an earlier run would quietly
    keep a later ``cpu=False`` run on the CPU. Every test starts and ends without one."""
    _fresh_state()
    yield
    _fresh_state()


def _fresh_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextlib.contextmanager
def fp32_matmuls() -> Iterator[None]:
    """Full fp32 matmuls and convolutions (no TF32, whose 10-bit mantissa is ~1e-3 off), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _on(device: torch.device, t: torch.Tensor) -> None:
    assert t.device.type == device.type, f"computed on {t.device}, expected {device}"


def _align_cfg(raw: dict, device: torch.device, out: Path, **loop: Any) -> AlignConfig:
    """The recipe ``raw`` on ``device`` (``loop.cpu`` off on a GPU), written to ``out``."""
    return from_dict(AlignConfig, {**raw, "output_dir": str(out),
                                   "loop": {**raw["loop"], "cpu": device.type == "cpu", **loop}})


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _norm(d: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([v.float().flatten() for v in d.values()]).norm())


# ------------------------------------------------------------------------------------------ the dense path


@pytest.mark.parametrize("name", ["ToyCLIP-ViT-T-16", "EVA02-Ti-16-golden"])
def test_dense_path_and_region_pooling_equal_the_cpu(cuda_device, name):
    """``encode_dense`` (value-path last block, and the standard one), ``pool_boxes`` (both box forms) and
    ``pool_masks`` on the device equal the CPU's fp32 results to 1e-4, at a non-native size (the positional
    embedding / RoPE tables are resized on the device)."""
    from densevlm.models import ModelSpec, create_backbone, masks_to_token_grid
    from test_align import TINY

    torch.manual_seed(0)
    model = create_backbone(ModelSpec(name=name, model_overrides=TINY if name.startswith("Toy") else {}))
    on_device = copy.deepcopy(model).to(cuda_device)
    p = model.patch_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5 * p + 3, 7 * p, generator=g)  # 5 x 7 tokens, 3 rows of pixels dropped
    corners = torch.rand(2, 6, 2, 2, generator=g)
    boxes = [torch.cat([c.min(1).values, c.max(1).values], -1) for c in corners]  # 6 boxes (x0, y0, x1, y1) each
    rows = torch.cat([torch.cat([torch.full((6, 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    masks = torch.rand(2, 3, x.shape[2], x.shape[3], generator=g) > 0.6

    def run(m: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            dense = m.encode_dense(x.to(device))
            out = {"dense": dense, "standard": m.encode_dense(x.to(device), last_block="standard"),
                   "boxes": m.pool_boxes(dense, [b.to(device) for b in boxes]),
                   "rows": m.pool_boxes(dense, rows.to(device)),
                   "masks": m.pool_masks(dense, masks_to_token_grid(masks.to(device), p))}
        for v in out.values():
            _on(device, v)
            assert v.dtype == torch.float32
        return {k: v.cpu() for k, v in out.items()}

    with fp32_matmuls():
        ref, got = run(model, CPU), run(on_device, cuda_device)
    assert ref["dense"].shape == (2, model.embed_dim, 5, 7) and ref["masks"].shape == (6, model.embed_dim)
    for key in ref:
        err = float((got[key] - ref[key]).abs().max())
        assert err <= 1e-4, f"{name} {key}: {err:.2e} from the CPU"
    assert torch.allclose(ref["boxes"], ref["rows"])


# ------------------------------------------------------------------------------------------ one training step


def _one_step(raw: dict, device: torch.device, out: Path, monkeypatch) -> dict[str, Any]:
    """One optimiser step of ``run_align`` on ``device``: its loss, the gradients the optimiser was given (by
    parameter name), the weights before and after, and where they lived."""
    import densevlm.engine.trainer as trainer_mod
    from densevlm.tasks.align import run_align
    from densevlm.methods.clipself import CLIPSelfObjective
    from densevlm.methods.densevlm import DenseVLMObjective

    seen: dict[str, Any] = {"loss": []}
    build_optimizer = trainer_mod.build_optimizer

    def spy_optimizer(model, cfg):
        opt = build_optimizer(model, cfg)
        names = {id(p): n for n, p in model.named_parameters()}

        def before_step(o, args, kwargs):
            params = [p for group in o.param_groups for p in group["params"] if p.grad is not None]
            seen["grads"] = {names[id(p)]: p.grad.detach().to("cpu", copy=True) for p in params}
            seen["before"] = {names[id(p)]: p.detach().to("cpu", copy=True) for p in params}
            seen["grad_device"] = params[0].grad.device

        opt.register_step_pre_hook(before_step)
        return opt

    monkeypatch.setattr(trainer_mod, "build_optimizer", spy_optimizer)
    for cls in (DenseVLMObjective, CLIPSelfObjective):
        def call(self, step_model, batch, _real=cls.__call__):
            result = _real(self, step_model, batch)
            seen["loss"].append(float(result.loss.detach()))
            return result

        monkeypatch.setattr(cls, "__call__", call)

    def on_step(step: int, model: torch.nn.Module) -> None:
        seen["after"] = {k: v for k, v in _trainable(model).items() if k in seen["grads"]}
        seen["weight_device"] = next(model.parameters()).device

    _fresh_state()
    run_align(_align_cfg(raw, device, out, max_steps=1, precision="no"), on_step=on_step)
    _fresh_state()
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("method", ["densevlm", "clipself"])
def test_one_fp32_step_equals_the_cpu_step(cuda_device, tmp_path, monkeypatch, method):
    """One DenseVLM / CLIPSelf step of the real loop (``run_align``: online teacher, text embeddings, RoIAlign,
    AdamW) on the device against the same step on the CPU: same initial weights, same batch.

    Tolerances: loss 1e-5 relative; gradients 1e-4 relative (of their norm, all tensors together) and 1e-3 per
    tensor; the updated weights 1e-4 of how far the step moved them. On the CPU, perturbing the inputs and weights
    by 1e-6 (relative) moves this step's loss by <= 3e-6 and its gradients by <= 8e-6 (1e-6 is the size of fp32
    rounding differences between CPU and GPU kernels with TF32 off), so the bars leave a factor of >= 10. Adam's
    eps is 1e-2 here, as in the other tests that compare training runs: with eps=1e-8 the first step is
    ``lr * sign(grad)`` and a gradient that is ~0 on both devices could flip a whole lr step."""
    from test_align import _tiny_cfg, _write_world

    raw = _tiny_cfg(tmp_path, _write_world(tmp_path, n_images=4), method)
    raw["ensemble_alpha"] = None
    raw["optim"] = {**raw["optim"], "eps": 1e-2}
    with fp32_matmuls():
        ref = _one_step(raw, CPU, tmp_path / "cpu", monkeypatch)
        got = _one_step(raw, cuda_device, tmp_path / "device", monkeypatch)
    assert ref["grad_device"].type == ref["weight_device"].type == "cpu"
    assert got["grad_device"].type == got["weight_device"].type == cuda_device.type
    assert len(ref["loss"]) == len(got["loss"]) == 1 and math.isfinite(ref["loss"][0])
    assert abs(got["loss"][0] - ref["loss"][0]) <= 1e-5 * max(1.0, abs(ref["loss"][0])), (got["loss"], ref["loss"])

    assert ref["before"].keys() == got["before"].keys() and len(ref["grads"]) > 4
    assert _max_diff(ref["before"], got["before"]) == 0.0  # the same initial weights
    grad_err = math.sqrt(sum(float((got["grads"][k] - g).norm()) ** 2 for k, g in ref["grads"].items()))
    assert grad_err <= 1e-4 * _norm(ref["grads"]), (grad_err, _norm(ref["grads"]))
    for k, g in ref["grads"].items():
        assert float((got["grads"][k] - g).norm()) <= 1e-3 * float(g.norm()) + 1e-8, k

    moved = {k: ref["after"][k] - ref["before"][k] for k in ref["after"]}
    apart = {k: got["after"][k] - ref["after"][k] for k in ref["after"]}
    assert _norm(moved) > 0 and _norm(apart) <= 1e-4 * _norm(moved), (_norm(apart), _norm(moved))


# ------------------------------------------------------------------------------------------ low precision


def _low_precision_run(tmp_path: Path, device: torch.device, monkeypatch, precision: str, steps: int,
                       on_trainer=None, **loop: Any) -> dict[str, Any]:
    """DenseVLM on the tiny toy world in ``precision`` for ``steps`` steps on ``device``: the trainer; at each
    student forward the autocast dtype in force (None: off), the dtype a matmul gets there and the dtype of the
    region features; the trainable weights before and after every step."""
    import densevlm.tasks.align as align
    import densevlm.methods.densevlm as method
    from densevlm.engine.trainer import Trainer
    from test_align import _tiny_cfg, _write_world

    seen: dict[str, Any] = {"autocast": [], "matmul": [], "dtypes": [], "weights": []}
    real = method.student_region_features

    def spy(model, images, boxes):
        kind = images.device.type
        seen["autocast"].append(torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)
        seen["matmul"].append((images.new_ones(2, 2) @ images.new_ones(2, 2)).dtype)
        feats = real(model, images, boxes)
        seen["dtypes"].append(feats.dtype)
        _on(device, feats)
        return feats

    class Spied(Trainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            seen["trainer"] = self
            seen["weights"].append(_trainable(self.model))  # before the first step
            if on_trainer is not None:
                on_trainer(self)

    def on_step(step: int, model: torch.nn.Module) -> None:
        seen["weights"].append(_trainable(model))
        if "on_step" in seen:  # set by the caller
            seen["on_step"](step)

    monkeypatch.setattr(method, "student_region_features", spy)
    monkeypatch.setattr(align, "Trainer", Spied)
    raw = _tiny_cfg(tmp_path, _write_world(tmp_path), "densevlm")
    raw["ensemble_alpha"] = None
    cfg = _align_cfg(raw, device, tmp_path / "run", max_steps=steps, precision=precision, **loop)
    seen["cfg"] = cfg
    seen["run"] = lambda: align.run_align(cfg, on_step=on_step)
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_a_few_steps_without_nan(cuda_device, tmp_path, monkeypatch, precision):
    """``loop.precision`` bf16 (autocast, 3 steps) and fp16 (autocast + accelerate's grad scaler, with gradient
    clipping, which unscales first; 8 steps, since the scaler starts at 2**16 and this toy loss, at temperature
    0.01, overflows fp16 gradients for the first few scales, which the scaler skips): the student's forward runs
    under autocast to that dtype, every loss and weight stays finite, and the weights move.

    The region features themselves come out in the low precision on the CPU; CUDA's autocast computes
    ``F.normalize``'s norm in fp32, so there the unit-norm dense map (and what is pooled from it) may be fp32.
    Dry run: accelerate gives fp16 on the CPU neither autocast nor a grad scaler, so there the fp16 run is fp32
    and checks that this is what happens; bf16 autocast does run on the CPU."""
    steps = 3 if precision == "bf16" else 8
    run = _low_precision_run(tmp_path, cuda_device, monkeypatch, precision, steps)
    if precision == "fp16":
        run["cfg"].optim.grad_clip = 1.0
    result = run["run"]()
    acc = run["trainer"].accelerator
    assert acc.mixed_precision == precision and acc.device.type == cuda_device.type
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if precision == "fp16" and cuda_device.type == "cpu":  # accelerate: no fp16 autocast, no scaler on the CPU
        assert set(run["autocast"]) == {None} and set(run["matmul"]) == set(run["dtypes"]) == {torch.float32}
        assert acc.scaler is None
    else:
        assert set(run["autocast"]) == {low} and set(run["matmul"]) == {low}, (run["autocast"], run["matmul"])
        allowed = {low} if cuda_device.type == "cpu" else {low, torch.float32}
        assert set(run["dtypes"]) <= allowed, run["dtypes"]
    if precision == "fp16" and cuda_device.type == "cuda":
        assert isinstance(acc.scaler, torch.amp.GradScaler)
        assert 1.0 <= acc.scaler.get_scale() <= 2.0 ** 16, acc.scaler.get_scale()
    assert len(run["dtypes"]) == steps and result.global_step == steps and "nonfinite_skipped" not in result.metrics
    assert all(math.isfinite(h["train"]["loss"]) for h in result.metrics["history"])
    weights = run["weights"]
    assert len(weights) == steps + 1 and all(torch.isfinite(w).all() for w in weights[-1].values())
    assert _max_diff(weights[0], weights[-1]) > 0


def test_fp16_overflowing_steps_are_skipped_by_the_grad_scaler(cuda_device, tmp_path, monkeypatch):
    """fp16 with a grad scaler, four DenseVLM steps:

    1. the scaler starts at 2**127, so the scaled loss overflows: the scaler skips the step (weights unchanged)
       and halves its scale. It is counted as ``amp_overflow_skipped``, not ``nonfinite_skipped``: the loss was
       finite and the trainer leaves overflowing gradients to the scaler (trainer.py), as in every fp16 run's first
       steps;
    2. (the test then sets the scale to 2**8, low enough for this toy loss's fp16 gradients) a normal step: the
       weights move;
    3. the loss is inf (``loop.on_nonfinite=skip``): the trainer counts the step and still calls the scaler, which
       sees the non-finite gradients, skips (weights unchanged) and halves its scale again;
    4. a normal step.

    On the GPU the scaler is accelerate's own ``GradScaler('cuda')`` with its initial scale raised; in the dry run
    accelerate makes none on the CPU (nor fp16 autocast), so a ``GradScaler('cpu')`` is given to it: the trainer's
    and accelerate's scaler paths run, in fp32."""
    from densevlm.methods.densevlm import DenseVLMObjective

    def huge_scale(trainer) -> None:
        acc = trainer.accelerator
        if cuda_device.type == "cuda":
            assert isinstance(acc.scaler, torch.amp.GradScaler)
        else:
            assert acc.scaler is None
        acc.scaler = torch.amp.GradScaler(cuda_device.type, init_scale=2.0 ** 127)

    calls = []
    real_call = DenseVLMObjective.__call__

    def inf_at_third(self, step_model, batch):
        out = real_call(self, step_model, batch)
        calls.append(float(out.loss.detach()))
        if len(calls) == 3:
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(DenseVLMObjective, "__call__", inf_at_third)
    run = _low_precision_run(tmp_path, cuda_device, monkeypatch, "fp16", 4, on_trainer=huge_scale,
                             on_nonfinite="skip")
    scales = []

    def after(step: int) -> None:
        scaler = run["trainer"].accelerator.scaler
        scales.append(scaler.get_scale())
        if step == 1:
            scaler.update(2.0 ** 8)  # (GradScaler.update's documented way to set the scale)

    run["on_step"] = after
    result = run["run"]()
    w = run["weights"]
    assert len(w) == 5 and len(calls) == 4 and all(math.isfinite(c) for c in calls)
    assert scales == [2.0 ** 126, 2.0 ** 8, 2.0 ** 7, 2.0 ** 7]  # halved by steps 1 and 3 only
    assert _max_diff(w[0], w[1]) == 0.0  # step 1: overflow, skipped by the scaler
    assert _max_diff(w[1], w[2]) > 0  # step 2
    assert _max_diff(w[2], w[3]) == 0.0  # step 3: inf loss, skipped
    assert _max_diff(w[3], w[4]) > 0  # step 4
    assert all(torch.isfinite(v).all() for v in w[4].values())
    assert result.global_step == 4
    assert result.metrics["nonfinite_skipped"] == 1 and result.metrics["history"][0]["nonfinite_skipped"] == 1
    # step 1's overflow is counted apart: the scaler skipped it, the loss was finite
    assert result.metrics["amp_overflow_skipped"] == 1 and result.metrics["history"][0]["amp_overflow_skipped"] == 1
    assert math.isfinite(result.metrics["history"][0]["train"]["loss"])  # the inf loss is not averaged in


# ------------------------------------------------------------------------------------------ the teacher cache


def test_teacher_cache_built_on_the_device_equals_the_cpu_build(cuda_device, tmp_path, monkeypatch):
    """``run_cache_teacher`` (the `cache-teacher` command) on the device writes the CPU build's shards: the same
    images, cells and metadata, features within 1e-3 (fp16 storage: one fp16 step of a unit vector's entry is
    <= 4.9e-4, so a CPU/GPU rounding difference may flip the last bit, nothing more)."""
    import densevlm.data.teacher_cache as data_cache
    from densevlm.tasks.teacher_cache import run_cache_teacher
    from test_teacher_cache import _cfg, _world

    base = _world(tmp_path)
    devices = []
    real = data_cache.cell_features

    def spy(teacher, images, *args, **kwargs):
        devices.append(images.device)
        out = real(teacher, images, *args, **kwargs)
        _on(images.device, out)
        return out

    monkeypatch.setattr(data_cache, "cell_features", spy)
    caches = {}
    with fp32_matmuls():
        for key, device in (("cpu", CPU), ("device", cuda_device)):
            cfg = _cfg(base, teacher_cache=str(tmp_path / f"cache_{key}"))
            cfg.loop.cpu = device.type == "cpu"
            _fresh_state()
            summary = run_cache_teacher(cfg, progress=False)
            assert summary["images"] == 8 and summary["cells_per_image"] == 309 and summary["dtype"] == "fp16"
            assert devices and all(d.type == device.type for d in devices), devices
            devices.clear()
            caches[key] = Path(cfg.teacher_cache)
    ref_manifest = json.loads((caches["cpu"] / "cache.json").read_text())
    assert json.loads((caches["device"] / "cache.json").read_text()) == ref_manifest
    shards = sorted(p.name for p in caches["cpu"].glob("shard-*.safetensors"))
    assert shards and shards == sorted(p.name for p in caches["device"].glob("shard-*.safetensors"))
    for name in shards:
        from safetensors import safe_open

        with safe_open(str(caches["cpu"] / name), "pt") as a, safe_open(str(caches["device"] / name), "pt") as b:
            assert a.metadata() == b.metadata()  # the images' keys and the metadata
            fa, fb = a.get_tensor("features"), b.get_tensor("features")
        assert fa.dtype == fb.dtype == torch.float16 and fa.shape == fb.shape and fa.shape[1] == 309
        assert float((fa.float() - fb.float()).abs().max()) <= 1e-3, name


# ------------------------------------------------------------------------------------------ preemption


def _is_device_0(name: str, device_type: str) -> bool:
    """``name`` (as a worker recorded it) is device 0 of that type (accelerate writes the CPU as 'cpu' or 'cpu:0')."""
    d = torch.device(name)
    return d.type == device_type and (d.index or 0) == 0


def _device_file(run_dir: Path, rank: int = 0) -> dict:
    return json.loads((run_dir.parent / f"{run_dir.name}.rank{rank}.device").read_text())


def test_sigkill_mid_epoch_then_resume_on_the_device_is_bit_identical(cuda_device, tmp_path, capsys):
    """tests/test_preemption.py's worker (dropout, so the device's RNG matters; accumulation 2; step checkpoints)
    on the device: killed with SIGKILL after step 9 (mid-epoch, after the step-8 checkpoint), resumed; weights and
    the per-epoch history equal an uninterrupted run on the device bit for bit. On a GPU the checkpoint must hold
    the CUDA RNG state (the dropout masks are drawn from it)."""
    import test_preemption as tp

    dev = cuda_device.type
    ref = tmp_path / "ref"
    tp._run_here(ref, device=dev)
    assert _is_device_0(_device_file(ref)["device"], dev)
    run = tmp_path / "run"
    (rc,), last = tp._interrupt(run, signal.SIGKILL, 9, device=dev)
    assert rc == -signal.SIGKILL and not (run / "weights.safetensors").exists()
    assert _is_device_0(_device_file(run)["device"], dev)
    saved = tp._pointer(run)["checkpoints"][-1]
    assert saved["step"] <= last and not saved["epoch_complete"]
    ckpt = torch.load(run / tp.CKPT_DIR / saved["file"], weights_only=True)
    assert ("cuda" in ckpt["rng"][0]) == (dev == "cuda")
    capsys.readouterr()
    tp._run_here(run, resume=True, device=dev)
    assert f"step {saved['step']})" in capsys.readouterr().out  # "resumed from ... (epoch e, batch b/12, step s)"
    assert _is_device_0(_device_file(run)["device"], dev)
    tp._weights_equal(ref, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"] == json.loads((ref / "metrics.json").read_text())["history"]


def test_two_processes_on_one_device_agree_on_the_step_to_save_and_resume_bit_identical(cuda_device, tmp_path):
    """tests/test_preemption.py's 2-process test with both processes on the one device (gloo, see
    tests/test_preemption.py::single_device_env): SIGUSR1 to rank 1 only after step 4; both ranks save after the
    same step and exit 75; the resumed run's weights equal an uninterrupted 2-process run's bit for bit."""
    import test_preemption as tp
    from densevlm.engine.preemption import PREEMPTED_EXIT_CODE

    dev = cuda_device.type
    ref = tmp_path / "ref"
    ref_procs = tp._start(ref, 2, device=dev)  # the uninterrupted run, beside the interrupted one
    try:
        run = tmp_path / "run"
        codes, last = tp._interrupt(run, signal.SIGUSR1, 4, nproc=2, target_rank=1, device=dev)
        out = ref_procs[0].communicate(timeout=240)[0]
        assert [p.wait(timeout=60) for p in ref_procs] == [0, 0], out[-2000:] + tp._stderr(ref)
    finally:
        for p in ref_procs:
            if p.poll() is None:
                p.kill()
    assert codes == [PREEMPTED_EXIT_CODE] * 2, tp._stderr(run)
    for r in (0, 1):
        for where in (_device_file(ref, r), _device_file(run, r)):
            assert _is_device_0(where["device"], dev), where
            assert where["backend"] == "gloo" and where["processes"] == 2, where
    r0 = json.loads((tmp_path / "run.rank0.json").read_text())
    r1 = json.loads((tmp_path / "run.rank1.json").read_text())
    assert r0["step"] == r1["step"] == tp._pointer(run)["checkpoints"][-1]["step"] and r0["signal"] == "SIGUSR1"
    tp._run(run, nproc=2, resume=True, device=dev)
    tp._weights_equal(ref, run)


# ------------------------------------------------------------------------------------------ torch.compile


def test_compiled_blocks_train_like_eager_ones_on_the_device(cuda_device, tmp_path):
    """tests/test_align.py::test_compiled_blocks_train_like_eager_ones on the device: ``loop.compile`` sends the
    blocks through inductor (Triton kernels on a GPU), and the run ends where the eager one does (loss 1e-3
    relative, weights 1e-2 of how far training moved them, Adam eps 1e-2 for the reason given there)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from densevlm.tasks.align import run_align
    from test_align import _tiny_cfg, _write_world, assert_compiled_run_matches_eager

    torch._dynamo.reset()  # blocks compiled by an earlier test (same code, same shapes) would not count as new graphs
    base = _tiny_cfg(tmp_path, _write_world(tmp_path, n_images=4))
    base["optim"] = {**base["optim"], "eps": 1e-2}
    out, graphs = {}, {}
    for compiled in (False, True):
        cfg = _align_cfg(base, cuda_device, tmp_path / f"run_{compiled}", epochs=1)
        cfg.loop.compile = compiled
        before = counters["stats"]["unique_graphs"]
        devices = []
        result = run_align(cfg, on_step=lambda step, m: devices.append(next(m.parameters()).device))
        assert devices and all(d.type == cuda_device.type for d in devices)
        graphs[compiled] = counters["stats"]["unique_graphs"] - before
        out[compiled] = (result.metrics["history"][0]["train"]["loss"],
                         load_file(str(Path(cfg.output_dir) / "weights.safetensors")))
    assert_compiled_run_matches_eager(out, graphs, base)


# ------------------------------------------------------------------------------------------ 2 processes, 1 GPU


def test_two_processes_on_one_device_keep_ranks_identical(cuda_device, tmp_path):
    """tests/test_align.py::test_two_process_training_keeps_ranks_identical with both processes on the one device
    (DDP over gloo on device tensors, see tests/test_preemption.py::single_device_env): DenseVLM, 8 images, 2 per
    process, so 2 steps; after each step both ranks hold exactly rank 0's weights, and the weights did move."""
    from test_align import _tiny_cfg, _write_world
    from test_preemption import _free_port, single_device_env

    raw = _tiny_cfg(tmp_path, _write_world(tmp_path))
    raw["loop"] = {**raw["loop"], "epochs": 1, "cpu": cuda_device.type == "cpu"}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    worker = Path(__file__).with_name("dist_worker.py")
    port = _free_port()
    procs, logs = [], []
    for rank in (0, 1):
        env = {**single_device_env(rank, 2, port, cuda_device.type), "DENSEVLM_TEST_GLOO": "1",
               "DENSEVLM_TEST_BYPASS_DDP": "0"}
        logs.append(tmp_path / f"rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(worker), str(cfg_file), str(tmp_path)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], "".join(f.read_text()[-3000:] for f in logs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2 and r["backend"] == "gloo", r
        assert _is_device_0(r["device"], cuda_device.type), r
        assert r["steps"] == 2 and len(r["diffs"]) == 2 and max(r["diffs"]) == 0.0, r
        assert r["moved"] > 0, r
