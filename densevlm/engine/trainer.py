"""The one training loop: prepare, forward through the objective, backward, step, log, checkpoint, evaluate.

Methods are objectives plugged into :class:`Trainer`; the loop itself knows nothing about any of them. What must
happen at fixed points on every process (e.g. a cache's writes and a barrier at an epoch's start) is an explicit
callback (:class:`Callback`), never hidden in a dataset or an objective.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, send_to_device, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.engine.checkpoint import (CheckpointError, latest_checkpoint, load_latest_good, rng_state,
                                       save_checkpoint, set_rng_state)
from densevlm.engine.optim import build_optimizer, build_scheduler
from densevlm.engine.preemption import PreemptionWatch, TrainingPreempted, ignore_in_workers
from densevlm.engine.run_dir import METRICS_FILE, WEIGHTS_FILE
from densevlm.engine.step_module import StepModule
from densevlm.methods.base import Objective
from densevlm.utils.io import atomic_save, atomic_write_json

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], dict[str, float]]
StateFn = Callable[[nn.Module], dict[str, torch.Tensor]]


class Callback(Protocol):
    """Hooks the trainer calls on every process, in the order registered."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the epoch's first batch is read (after the sampler and the dataset have the epoch)."""


@runtime_checkable
class StreamingDataset(Protocol):
    """A dataset that splits itself over processes and loader workers and can start inside an epoch (shards).

    The trainer hands it the topology once (``configure`` returns this process's batches per epoch, equal on every
    rank) and before every epoch where to start (``set_position``: the epoch and the batches this rank already
    did, 0 unless resumed). It yields collated batches; the trainer neither samples nor skips for it.
    """

    def configure(self, *, rank: int, world_size: int, batch_size: int, num_workers: int) -> int:
        ...

    def set_position(self, epoch: int, batches_done: int) -> None:
        ...


class _DeviceLoader:
    """A streaming dataset's loader, its batches moved to the device (what accelerate's prepared loader does)."""

    def __init__(self, loader: DataLoader, batches: int, device: torch.device) -> None:
        self.loader, self.batches, self.device = loader, batches, device

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield send_to_device(batch, self.device)


def _per_parameter_allreduce(state, bucket):  # annotated below: DDP checks the real types, not strings
    """DDP comm hook: average each parameter's gradient with an all-reduce of its own.

    DDP reduces its first step as one bucket in parameter order and later steps in buckets rebuilt in backward
    order. A flat all-reduce's summation order depends on where an element sits in its bucket, so a process
    resumed from a checkpoint (its first step on the initial layout) summed differently, in the last bits, from
    the uninterrupted run at that step, and the weights drifted apart (issue 23). Per parameter the order depends
    on the parameter alone: the same at every step of every process.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    grads = bucket.gradients()  # views of bucket.buffer()
    futs = [dist.all_reduce(g.div_(world), async_op=True).get_future() for g in grads]

    def into_buffer(_: Any) -> torch.Tensor:
        buffer, offset = bucket.buffer(), 0
        for g in grads:  # a no-op copy where g is a view of the buffer (as DDP makes them)
            view = buffer[offset:offset + g.numel()]
            if view.data_ptr() != g.data_ptr():
                view.copy_(g.flatten())
            offset += g.numel()
        return buffer

    return torch.futures.collect_all(futs).then(into_buffer)


_per_parameter_allreduce.__annotations__ = {"state": object, "bucket": torch.distributed.GradBucket,
                                            "return": torch.futures.Future[torch.Tensor]}


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped training; the message names the step, the images and the checkpoint."""


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


def reset_mixed_precision(precision: str) -> None:
    """Let this process's next Accelerator take ``precision``.

    accelerate keeps one mixed precision per process (``AcceleratorState``) and refuses an Accelerator that asks for
    another, so a process that trains one stage in fp32 and the next in bf16 (the bf16 parity benchmark, a demo)
    would fail on the second. The precision part of the state is dropped when it differs; the process group
    (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", precision)) != precision:
        AcceleratorState._reset_state()


def resolve_precision(precision: str, cpu: bool) -> str:
    """'auto' picks bf16 where the GPU supports it, fp16 on other GPUs, and full precision on the CPU."""
    if precision != "auto":
        return precision
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def compile_blocks(model: nn.Module) -> int:
    """Regional ``torch.compile``: each of the model's vision transformer blocks, in place (state-dict keys and
    parameters unchanged); returns how many. Blocks of one class share the compiled code, so this compiles once
    per block class rather than once per model, and the value-path last block's own forward stays eager."""
    blocks = model.visual_blocks() if hasattr(model, "visual_blocks") else []
    if not blocks:
        raise ValueError(f"loop.compile: {type(model).__name__} has no vision transformer blocks to compile")
    for block in blocks:
        block.compile()
    return len(blocks)


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
class _Position:
    """Where a (resumed) run continues: the epoch, the batches of it already done, and the state around them."""

    epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    skip_batches: int = 0
    partial: dict = field(default_factory=dict)  # the epoch's running sums so far
    pending_rng: Optional[dict] = None  # RNG states to restore before the first resumed forward
    initial: Optional[dict] = None  # the initial weights, for ensembling


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
        callbacks: objects with the :class:`Callback` hooks (e.g. the teacher targets of a lazily filled cache).

    Checkpoints (``checkpoints/``, see :mod:`densevlm.engine.checkpoint`) are written every ``loop.checkpoint_every``
    epochs and every ``loop.checkpoint_every_steps`` steps; :meth:`fit` with ``resume`` continues from the newest
    good one exactly. SIGTERM/SIGUSR1 end :meth:`fit` after the current step with a checkpoint and
    :class:`~densevlm.engine.preemption.TrainingPreempted`; a non-finite loss or gradient raises
    :class:`NonFiniteError` or skips the step (``loop.on_nonfinite``).
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
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.model, self.objective, self.dataset, self.collate_fn = model, objective, dataset, collate_fn
        self.loop, self.optim, self.run_dir = loop, optim, Path(run_dir)
        self.evaluate, self.ensemble_alpha, self.on_step = evaluate, ensemble_alpha, on_step
        self.callbacks = list(callbacks)
        self.export_state = export_state or (lambda m: m.state_dict())
        if ensemble_alpha is not None and not 0.0 <= ensemble_alpha <= 1.0:
            raise ValueError(f"ensemble_alpha must be in [0, 1], got {ensemble_alpha}")
        precision = resolve_precision(loop.precision, loop.cpu)
        reset_mixed_precision(precision)
        self.accelerator = Accelerator(
            mixed_precision=precision,
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
    def _gather_rng(self) -> list[dict[str, Any]]:
        """Every process's RNG states, indexed by rank (a collective: all ranks call it)."""
        state = rng_state()
        if self.accelerator.num_processes == 1:
            return [state]
        import torch.distributed as dist

        # Sent as torch.save bytes (pickled tensors do not survive all_gather_object), read back weights-only.
        buf = io.BytesIO()
        torch.save(state, buf)
        blobs: list[Any] = [None] * self.accelerator.num_processes
        dist.all_gather_object(blobs, buf.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]

    def _agree(self, nonfinite: bool, watch: PreemptionWatch) -> tuple[bool, Optional[str]]:
        """(whether any rank's step was non-finite, the signal any rank received), the same on every rank.

        One all-reduce per step carries both flags.
        """
        if self.accelerator.num_processes == 1:
            return nonfinite, watch.signal_name
        import torch.distributed as dist

        t = torch.tensor([int(nonfinite), watch.code], device=self.accelerator.device, dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item()), watch.name_of(int(t[1].item()))

    def _batch_images(self, batch: Any) -> str:
        """The batch's images for error messages: dataset indices, with file names where the dataset knows them."""
        index = batch.get("index") if isinstance(batch, dict) else None
        if index is None:
            return "unknown (the batch carries no 'index')"
        names = []
        for i in torch.as_tensor(index).flatten().tolist():
            name = self.dataset.image_name(i) if hasattr(self.dataset, "image_name") else None
            names.append(f"{i} ({name})" if name else str(i))
        return ", ".join(names)

    def _start_epoch(self, epoch: int, sampler: Optional[EpochSampler], loader: Any) -> None:
        """Give the sampler, the loader and the dataset the epoch, then call the callbacks' ``on_epoch_start``."""
        if sampler is not None:
            sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):  # accelerate's loader keeps its own epoch counter; keep it in step
            loader.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        for callback in self.callbacks:
            callback.on_epoch_start(epoch)

    def _resume(self, step_module: nn.Module, optimizer: Any, scheduler: Any, n_batches: int
                ) -> Optional["_Position"]:
        """Load the newest good checkpoint into the model, optimiser, schedule and scaler; where to continue."""
        acc = self.accelerator
        t0 = time.time()
        found = load_latest_good(self.run_dir)
        if found is None:
            return None
        path, state = found
        try:
            acc.unwrap_model(step_module).model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            detail = " ".join(line.strip() for line in str(err).splitlines())
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimiser: {detail[:500]}") from None
        scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        complete = state.get("epoch_complete", True)  # checkpoints of the earlier format were per epoch
        if not complete and len(rngs) != acc.num_processes:
            raise CheckpointError(f"{path} was written mid-epoch by {len(rngs)} process(es); resume it with the "
                                  f"same number (now {acc.num_processes})")
        rng = rngs[acc.process_index % len(rngs)]
        acc.step = state.get("accum_step", 0)  # accelerate's micro-batch counter decides when gradients sync
        pos = _Position(global_step=state["global_step"], history=state["history"], initial=state.get("initial"))
        if complete:
            pos.epoch = state["epoch"] + 1
            set_rng_state(rng)
            where = f"epoch {state['epoch'] + 1} done"
        else:
            # Restored just before the first resumed forward: an uninterrupted run drew the loader's seed at the
            # start of the epoch, before this state was saved.
            pos.epoch, pos.skip_batches, pos.partial, pos.pending_rng = (
                state["epoch"], state["batches_done"], state["partial"], rng)
            where = f"epoch {state['epoch'] + 1}, batch {pos.skip_batches}/{n_batches}"
        acc.print(f"resumed from {path} ({where}, step {pos.global_step}) in {time.time() - t0:.1f}s")
        return pos

    # ------------------------------------------------------------------ loop
    def fit(self, *, resume: bool = False, stop_after_epoch: Optional[int] = None) -> FitResult:
        """Train; with ``resume`` continue exactly from the run directory's newest good checkpoint.

        Raises :class:`~densevlm.engine.preemption.TrainingPreempted` after checkpointing when SIGTERM/SIGUSR1
        arrives, and :class:`NonFiniteError` on a non-finite loss or gradient (unless ``loop.on_nonfinite`` is
        "skip"). ``stop_after_epoch`` ends the process's work after that epoch's checkpoint.
        """
        acc, loop = self.accelerator, self.loop
        t0 = time.time()
        set_seed(loop.seed)
        # The initial weights, for weight-space ensembling; taken before any step.
        initial = ({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                   if self.ensemble_alpha is not None else None)

        if loop.world_size is not None and acc.num_processes != loop.world_size:
            raise ValueError(f"loop.world_size: the recipe expects {loop.world_size} processes, this one (rank "
                             f"{acc.process_index}) is in a world of {acc.num_processes}: check --num_machines and "
                             "--num_processes of every node's launch")
        worker_init = ignore_in_workers if loop.handle_signals and loop.num_workers > 0 else None
        streaming = isinstance(self.dataset, StreamingDataset)
        sampler: Optional[EpochSampler] = None
        if streaming:  # it reads its own part of each epoch: not sampled, not split or moved by accelerate
            batches = self.dataset.configure(rank=acc.process_index, world_size=acc.num_processes,
                                             batch_size=loop.batch_size, num_workers=loop.num_workers)
            loader: Any = _DeviceLoader(DataLoader(self.dataset, batch_size=None, num_workers=loop.num_workers,
                                                   worker_init_fn=worker_init), batches, acc.device)
        else:
            sampler = EpochSampler(len(self.dataset), loop.seed)
            loader = DataLoader(
                self.dataset, batch_size=loop.batch_size, sampler=sampler, drop_last=True,
                num_workers=loop.num_workers, collate_fn=self.collate_fn, worker_init_fn=worker_init,
                # Not persistent: workers re-fork each epoch and so see the dataset's current epoch (its
                # augmentation seed).
            )
        if len(loader) == 0:
            raise ValueError(
                f"the training set has {len(self.dataset)} items, fewer than one batch of {loop.batch_size}"
            )
        optimizer = build_optimizer(self.model, self.optim)
        if loop.compile:
            acc.print(f"torch.compile: {compile_blocks(self.model)} blocks (compiled at the first step)")
        step_module = StepModule(self.model)
        if streaming:
            step_module, optimizer = acc.prepare(step_module, optimizer)
        else:
            step_module, optimizer, loader = acc.prepare(step_module, optimizer, loader)
        if loop.exact_resume_reduction and isinstance(step_module, torch.nn.parallel.DistributedDataParallel):
            # resume bit-exact (see the hook)
            step_module.register_comm_hook(None, _per_parameter_allreduce)
        self.objective.prepare(acc.device)

        steps_per_epoch = max(1, len(loader) // loop.grad_accum_steps)
        total_steps = steps_per_epoch * loop.epochs
        if loop.max_steps is not None:
            total_steps = min(total_steps, loop.max_steps)
        epochs = min(loop.epochs, math.ceil(total_steps / steps_per_epoch))
        scheduler = build_scheduler(optimizer, self.optim, total_steps)

        pos = self._resume(step_module, optimizer, scheduler, len(loader)) if resume else None
        pos = pos or _Position()
        start_epoch, global_step, history = pos.epoch, pos.global_step, pos.history
        if pos.initial is not None:  # the run's own initial weights (these are the checkpoint's, if resumed)
            initial = pos.initial
        skip_batches, partial, pending_rng = pos.skip_batches, pos.partial, pos.pending_rng

        acc.init_trackers("tensorboard")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        acc.print(f"training {trainable / 1e6:.2f}M parameters for {total_steps} steps "
                  f"({steps_per_epoch}/epoch, {acc.num_processes} process(es), precision {acc.mixed_precision})")
        grad_params = [p for p in self.model.parameters() if p.requires_grad]
        skipped_total = sum(r.get("nonfinite_skipped", 0) for r in history)
        amp_skipped_total = sum(r.get("amp_overflow_skipped", 0) for r in history)

        def save(reason: str, epoch: int, batches_done: int, complete: bool, partial_now: dict) -> Optional[Path]:
            rngs = self._gather_rng()  # collective: every rank
            path = None
            if acc.is_main_process:
                path = save_checkpoint(self.run_dir, {
                    "model": acc.unwrap_model(step_module).model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "rng": rngs,
                    "world_size": acc.num_processes,
                    "epoch": epoch,
                    "epoch_complete": complete,
                    "batches_done": batches_done,
                    "accum_step": acc.step,
                    "global_step": global_step,
                    "history": history,
                    "partial": partial_now,
                    "initial": initial,
                }, step=global_step, keep=loop.keep_checkpoints, reason=reason)
            acc.wait_for_everyone()
            return path or latest_checkpoint(self.run_dir)

        with PreemptionWatch(enabled=loop.handle_signals) as watch:
            for epoch in range(start_epoch, epochs):
                if global_step >= total_steps:
                    break
                self._start_epoch(epoch, sampler, loader)
                step_module.train()
                # Mid-epoch resume: the same order (fixed by seed and epoch), its first batches skipped unread.
                batches_done, epoch_loader = skip_batches, loader
                if streaming:  # it starts at the right shard and sample itself
                    self.dataset.set_position(epoch, skip_batches)
                elif skip_batches:
                    epoch_loader = acc.skip_first_batches(loader, skip_batches)
                running: dict[str, float] = dict(partial.get("running", {}))
                n_running = partial.get("n_running", 0)
                epoch_sums: dict[str, float] = dict(partial.get("epoch_sums", {}))
                epoch_n = partial.get("epoch_n", 0)
                epoch_skipped = partial.get("skipped", 0)
                epoch_amp_skipped = partial.get("amp_skipped", 0)
                skip_batches, partial = 0, {}
                epoch_steps = min(steps_per_epoch, total_steps - (global_step - batches_done // loop.grad_accum_steps))
                bar = tqdm(total=epoch_steps, initial=batches_done // loop.grad_accum_steps,
                           desc=f"epoch {epoch + 1}/{epochs}", disable=not acc.is_local_main_process,
                           dynamic_ncols=True)
                pending: list[dict[str, float]] = []  # metrics of the micro-batches of the current step
                nonfinite, signal_name = False, None

                def partial_state() -> dict[str, Any]:
                    return {"running": running, "n_running": n_running, "epoch_sums": epoch_sums,
                            "epoch_n": epoch_n, "skipped": epoch_skipped, "amp_skipped": epoch_amp_skipped}

                for batch in epoch_loader:
                    if pending_rng is not None:
                        set_rng_state(pending_rng)
                        pending_rng = None
                    batches_done += 1
                    with acc.accumulate(step_module):
                        out = self.objective(step_module, batch)
                        loss_finite = bool(torch.isfinite(out.loss.detach()))
                        nonfinite = nonfinite or not loss_finite
                        # Backward even on a bad loss: under DDP every rank must join the gradient all-reduce.
                        acc.backward(out.loss)
                        pending.append({"loss": float(out.loss.detach()), **{k: float(v) for k, v in out.metrics.items()}})
                        if not acc.sync_gradients:
                            continue
                        grad_norm = None
                        if self.optim.grad_clip is not None:
                            grad_norm = acc.clip_grad_norm_(grad_params, self.optim.grad_clip)
                        elif acc.scaler is None and not nonfinite:
                            grads = [p.grad for p in grad_params if p.grad is not None]
                            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
                        # Under fp16 the grad scaler owns overflowing gradients (it skips those steps itself).
                        if acc.scaler is None and grad_norm is not None and not bool(torch.isfinite(grad_norm)):
                            nonfinite = True
                        bad, signal_name = self._agree(nonfinite, watch)
                        if bad:
                            if loop.on_nonfinite == "stop":
                                bar.close()
                                last = latest_checkpoint(self.run_dir) if acc.is_main_process else None
                                what = "loss" if not loss_finite else "gradient"
                                raise NonFiniteError(
                                    f"non-finite {what} (loss {pending[-1]['loss']}) at step {global_step + 1} "
                                    f"(epoch {epoch + 1}, batch {batches_done}/{len(loader)}); batch images on "
                                    f"process {acc.process_index}: {self._batch_images(batch)}; last good "
                                    f"checkpoint: {last or 'none yet'}; set loop.on_nonfinite=skip to skip such "
                                    "steps instead")
                            epoch_skipped += 1
                            if acc.scaler is not None:  # fp16: the scaler sees the bad gradients, skips, lowers its scale
                                optimizer.step()
                            acc.print(f"step {global_step + 1}: non-finite loss or gradient, step skipped "
                                      f"({epoch_skipped} this epoch)")
                            acc.log({"train/nonfinite_skipped": skipped_total + epoch_skipped}, step=global_step + 1)
                        else:
                            scale = acc.scaler.get_scale() if acc.scaler is not None else None
                            optimizer.step()
                            # fp16: finite loss, overflowing scaled gradients; the scaler skipped the update and
                            # lowered its scale (routine in a run's first steps). Counted apart from the non-finite
                            # losses: the loss is real and stays in the averages. Read from the scale, not from
                            # accelerate's step_was_skipped, which misses the skips of fused optimisers (ours).
                            if scale is not None and acc.scaler.get_scale() < scale:
                                epoch_amp_skipped += 1
                                acc.log({"train/amp_overflow_skipped": amp_skipped_total + epoch_amp_skipped},
                                        step=global_step + 1)
                            for m in pending:
                                for k, v in m.items():
                                    running[k] = running.get(k, 0.0) + v
                                    epoch_sums[k] = epoch_sums.get(k, 0.0) + v
                                n_running += 1
                                epoch_n += 1
                        optimizer.zero_grad(set_to_none=True)
                        pending, nonfinite = [], False
                    # A skipped step still counts: the schedule and the data order stay those of the recipe.
                    scheduler.step()
                    global_step += 1
                    bar.update(1)
                    if self.on_step is not None:
                        self.on_step(global_step, acc.unwrap_model(step_module).model)
                    if n_running and (global_step % loop.log_every == 0 or global_step == total_steps):
                        scalars = {f"train/{k}": v / n_running for k, v in running.items()}
                        scalars["train/lr"] = scheduler.get_last_lr()[0]
                        acc.log(scalars, step=global_step)
                        bar.set_postfix(loss=f"{scalars['train/loss']:.4f}")
                        running, n_running = {}, 0
                    end_of_epoch = batches_done >= len(loader) or global_step >= total_steps
                    if signal_name is not None:  # received during this step, by any rank: it is the last one
                        bar.close()
                        path = save("preempt", epoch, batches_done, False, partial_state())
                        acc.end_training()
                        raise TrainingPreempted(signal_name, global_step, path)
                    if (loop.checkpoint_every_steps and global_step % loop.checkpoint_every_steps == 0
                            and not end_of_epoch):
                        save("step", epoch, batches_done, False, partial_state())
                    if global_step >= total_steps:
                        break
                bar.close()
                if pending_rng is not None:  # resumed after the epoch's last batch: nothing left to read
                    set_rng_state(pending_rng)
                    pending_rng = None

                last_epoch = epoch == epochs - 1 or global_step >= total_steps
                record: dict[str, Any] = {"epoch": epoch + 1, "step": global_step,
                                          "train": {k: round(v / max(1, epoch_n), 6) for k, v in epoch_sums.items()}}
                if epoch_skipped:
                    record["nonfinite_skipped"] = epoch_skipped
                    skipped_total += epoch_skipped
                if epoch_amp_skipped:
                    record["amp_overflow_skipped"] = epoch_amp_skipped
                    amp_skipped_total += epoch_amp_skipped
                if acc.is_main_process and self.evaluate is not None and (
                    last_epoch or (loop.eval_every and (epoch + 1) % loop.eval_every == 0)
                ):
                    record["eval"] = self._run_eval(initial)
                    acc.log({f"eval/{k}": v for k, v in record["eval"].items() if isinstance(v, (int, float))},
                            step=global_step)
                history.append(record)
                signal_name = watch.requested(acc)
                if (epoch + 1) % loop.checkpoint_every == 0 or last_epoch or signal_name is not None:
                    path = save("epoch", epoch, batches_done, True, {})
                if signal_name is not None and not last_epoch:
                    acc.end_training()
                    raise TrainingPreempted(signal_name, global_step, path)
                if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last_epoch:
                    acc.end_training()
                    return FitResult(self.run_dir, global_step, epoch + 1, {"history": history}, time.time() - t0)

        metrics: dict[str, Any] = {"history": history, "global_step": global_step,
                                   "train_seconds": round(time.time() - t0, 2)}
        if skipped_total:
            metrics["nonfinite_skipped"] = skipped_total
        if amp_skipped_total:
            metrics["amp_overflow_skipped"] = amp_skipped_total
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
