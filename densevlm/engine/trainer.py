"""The one training loop: prepare, forward through the objective, backward, step, log, checkpoint, evaluate.

Methods (contrastive pre-training, CLIPSelf, DenseVLM) are objectives plugged into :class:`Trainer`; the loop
itself knows nothing about any of them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.engine.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from densevlm.engine.optim import build_optimizer, build_scheduler
from densevlm.engine.run_dir import METRICS_FILE, WEIGHTS_FILE
from densevlm.engine.step_module import StepModule
from densevlm.methods.base import Objective
from densevlm.utils.io import atomic_save, atomic_write_json

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], dict[str, float]]
StateFn = Callable[[nn.Module], dict[str, torch.Tensor]]


class EpochSampler(Sampler[int]):
    """A shuffled order fixed by (seed, epoch): identical on every process and after a resume."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def resolve_precision(precision: str, cpu: bool) -> str:
    """'auto' picks bf16 where the GPU supports it, fp16 on other GPUs, and full precision on the CPU."""
    if precision != "auto":
        return precision
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def ensemble_state(student: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Weight-space ensembling: ``alpha * student + (1 - alpha) * initial`` for every floating tensor."""
    out = {}
    for k, v in student.items():
        # Frozen tensors stay bit-exact (0.9 x + 0.1 x is not always x in floating point).
        init = initial[k].to(v.device)
        if torch.is_floating_point(v) and not torch.equal(v, init):
            out[k] = (alpha * v.float() + (1.0 - alpha) * init.float()).to(v.dtype)
        else:
            out[k] = v
    return out


@dataclass
class FitResult:
    run_dir: Path
    global_step: int
    epochs_done: int
    metrics: dict[str, Any]
    seconds: float


class Trainer:
    """Trains ``model`` with ``objective`` on ``dataset`` and writes a run directory.

    Args:
        model: the trained model (its ``requires_grad`` flags define what trains).
        objective: see :class:`~densevlm.methods.base.Objective`.
        dataset, collate_fn: the training data.
        loop, optim: loop and optimiser configs.
        run_dir: an existing run directory (see :func:`~densevlm.engine.run_dir.prepare_run_dir`).
        evaluate: optional ``fn(model) -> {metric: value}`` run on the main process every ``loop.eval_every``
            epochs and at the end, on the weights that would be saved (ensembled when ``ensemble_alpha`` is set).
        export_state: ``fn(model) -> state dict`` written to ``weights.safetensors`` (default: ``state_dict()``).
        ensemble_alpha: if set, saved weights are ``alpha * student + (1 - alpha) * initial``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        objective: Objective,
        dataset: Dataset,
        collate_fn: Optional[Callable] = None,
        loop: LoopConfig,
        optim: OptimConfig,
        run_dir: Path,
        evaluate: Optional[EvalFn] = None,
        export_state: Optional[StateFn] = None,
        ensemble_alpha: Optional[float] = None,
        on_step: Optional[Callable[[int, nn.Module], None]] = None,
    ) -> None:
        self.model, self.objective, self.dataset, self.collate_fn = model, objective, dataset, collate_fn
        self.loop, self.optim, self.run_dir = loop, optim, Path(run_dir)
        self.evaluate, self.ensemble_alpha, self.on_step = evaluate, ensemble_alpha, on_step
        self.export_state = export_state or (lambda m: m.state_dict())
        if ensemble_alpha is not None and not 0.0 <= ensemble_alpha <= 1.0:
            raise ValueError(f"ensemble_alpha must be in [0, 1], got {ensemble_alpha}")
        self.accelerator = Accelerator(
            mixed_precision=resolve_precision(loop.precision, loop.cpu),
            gradient_accumulation_steps=loop.grad_accum_steps,
            cpu=loop.cpu,
            log_with="tensorboard",
            project_dir=str(self.run_dir),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=loop.find_unused_parameters)],
        )

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _saved_weights(self, initial: Optional[dict[str, torch.Tensor]]) -> Iterator[nn.Module]:
        """The model holding the weights that are saved and evaluated: the ensemble when ``ensemble_alpha`` is set.

        The training weights are restored on exit.
        """
        if self.ensemble_alpha is None or initial is None:
            yield self.model
            return
        backup = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(ensemble_state(backup, initial, self.ensemble_alpha))
        try:
            yield self.model
        finally:
            self.model.load_state_dict(backup)

    def _run_eval(self, initial: Optional[dict[str, torch.Tensor]]) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with self._saved_weights(initial) as model, torch.no_grad():
                return self.evaluate(model)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ loop
    def fit(self, *, resume: bool = False, stop_after_epoch: Optional[int] = None) -> FitResult:
        """Train; with ``resume`` continue from the run directory's latest checkpoint.

        ``stop_after_epoch`` ends the process's work after that epoch's checkpoint (used to test that an
        interrupted and resumed run equals an uninterrupted one).
        """
        acc, loop = self.accelerator, self.loop
        t0 = time.time()
        set_seed(loop.seed)
        # The initial weights, for weight-space ensembling; taken before any step.
        initial = ({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                   if self.ensemble_alpha is not None else None)

        sampler = EpochSampler(len(self.dataset), loop.seed)
        loader = DataLoader(
            self.dataset, batch_size=loop.batch_size, sampler=sampler, drop_last=True,
            num_workers=loop.num_workers, collate_fn=self.collate_fn,
            # Not persistent: workers re-fork each epoch and so see the dataset's current epoch (its augmentation seed).
        )
        if len(loader) == 0:
            raise ValueError(
                f"the training set has {len(self.dataset)} items, fewer than one batch of {loop.batch_size}"
            )
        optimizer = build_optimizer(self.model, self.optim)
        step_module = StepModule(self.model)
        step_module, optimizer, loader = acc.prepare(step_module, optimizer, loader)
        self.objective.prepare(acc.device)

        steps_per_epoch = max(1, len(loader) // loop.grad_accum_steps)
        total_steps = steps_per_epoch * loop.epochs
        if loop.max_steps is not None:
            total_steps = min(total_steps, loop.max_steps)
        epochs = min(loop.epochs, math.ceil(total_steps / steps_per_epoch))
        scheduler = build_scheduler(optimizer, self.optim, total_steps)

        start_epoch, global_step, history = 0, 0, []
        if resume:
            ckpt_path = latest_checkpoint(self.run_dir)
            if ckpt_path is not None:
                state = load_checkpoint(ckpt_path)
                acc.unwrap_model(step_module).model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                set_rng_state(state["rng"])
                if state.get("initial") is not None:
                    initial = state["initial"]
                start_epoch, global_step, history = state["epoch"] + 1, state["global_step"], state["history"]
                acc.print(f"resumed from {ckpt_path} (epoch {state['epoch'] + 1} done, step {global_step})")

        acc.init_trackers("tensorboard")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        acc.print(f"training {trainable / 1e6:.2f}M parameters for {total_steps} steps "
                  f"({steps_per_epoch}/epoch, {acc.num_processes} process(es), precision {acc.mixed_precision})")
        grad_params = [p for p in self.model.parameters() if p.requires_grad]

        for epoch in range(start_epoch, epochs):
            if global_step >= total_steps:
                break
            sampler.set_epoch(epoch)
            if hasattr(loader, "set_epoch"):  # accelerate's loader keeps its own epoch counter; keep it in step
                loader.set_epoch(epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            step_module.train()
            bar = tqdm(total=min(steps_per_epoch, total_steps - global_step), desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not acc.is_local_main_process, dynamic_ncols=True)
            running: dict[str, float] = {}
            n_running = 0
            epoch_sums: dict[str, float] = {}
            epoch_n = 0
            for batch in loader:
                with acc.accumulate(step_module):
                    out = self.objective(step_module, batch)
                    if not torch.isfinite(out.loss):
                        raise FloatingPointError(f"non-finite loss {out.loss.item()} at step {global_step}")
                    acc.backward(out.loss)
                    if acc.sync_gradients and self.optim.grad_clip is not None:
                        acc.clip_grad_norm_(grad_params, self.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": float(out.loss.detach()), **out.metrics}.items():
                    running[k] = running.get(k, 0.0) + float(v)
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + float(v)
                n_running += 1
                epoch_n += 1
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                global_step += 1
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(global_step, acc.unwrap_model(step_module).model)
                if global_step % loop.log_every == 0 or global_step == total_steps:
                    scalars = {f"train/{k}": v / n_running for k, v in running.items()}
                    scalars["train/lr"] = scheduler.get_last_lr()[0]
                    acc.log(scalars, step=global_step)
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}")
                    running, n_running = {}, 0
                if global_step >= total_steps:
                    break
            bar.close()

            last_epoch = epoch == epochs - 1 or global_step >= total_steps
            record: dict[str, Any] = {"epoch": epoch + 1, "step": global_step,
                                      "train": {k: round(v / max(1, epoch_n), 6) for k, v in epoch_sums.items()}}
            if acc.is_main_process and self.evaluate is not None and (
                last_epoch or (loop.eval_every and (epoch + 1) % loop.eval_every == 0)
            ):
                record["eval"] = self._run_eval(initial)
                acc.log({f"eval/{k}": v for k, v in record["eval"].items() if isinstance(v, (int, float))},
                        step=global_step)
            history.append(record)
            if acc.is_main_process and ((epoch + 1) % loop.checkpoint_every == 0 or last_epoch):
                save_checkpoint(self.run_dir, epoch, {
                    "model": acc.unwrap_model(step_module).model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "epoch": epoch,
                    "global_step": global_step,
                    "history": history,
                    "initial": initial,
                }, keep=loop.keep_checkpoints)
            acc.wait_for_everyone()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last_epoch:
                acc.end_training()
                return FitResult(self.run_dir, global_step, epoch + 1, {"history": history}, time.time() - t0)

        metrics: dict[str, Any] = {"history": history, "global_step": global_step,
                                   "train_seconds": round(time.time() - t0, 2)}
        if history and "eval" in history[-1]:
            metrics["final"] = history[-1]["eval"]
        if acc.is_main_process:
            from safetensors.torch import save_file

            with self._saved_weights(initial) as model:
                state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.export_state(model).items()}
            atomic_save(self.run_dir / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
            atomic_write_json(self.run_dir / METRICS_FILE, metrics)
        acc.wait_for_everyone()
        acc.end_training()
        return FitResult(self.run_dir, global_step, epochs, metrics, time.time() - t0)
