"""How a run trains: ``train_step``, ``train_one_epoch``, ``evaluate``, the epochs, and ``main(cfg, options)``.

Why this shape: torchvision's ``references/classification/train.py`` (a plain loop, full-state
checkpoints), with what the paper's training needs on top (``mdeq.engine``'s docstring lists it:
optimisers and schedule, the unrolled warm-up, losses, no model selection, stabilisers, mixed precision,
multi-GPU). Read top to bottom: one step, one epoch, one evaluation, the epochs with their logs, and the
entry point that puts a run together (``mdeq.engine.build.assemble``) in its locked folder
(``mdeq.engine.rundir``). ``python -m mdeq.train`` is its command line.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mdeq.core.config import ConfigError, ExperimentConfig
from mdeq.core.heads import upsample_logits
from mdeq.engine import allocator, distributed, progress
from mdeq.engine.build import Context, assemble, check_baseline, resolve_device
from mdeq.engine.checkpoint import unwrap_model
from mdeq.engine.distributed import DistInfo, log
from mdeq.engine.loaders import loader_generator
from mdeq.engine.data import IGNORE_INDEX
from mdeq.engine.metrics import ConfusionMatrix, MetricLogger, SmoothedValue, topk_correct
from mdeq.engine.options import RunOptions, TrainState
from mdeq.engine.rundir import end_chunk, resume_hint, run_folder_lock
from mdeq.engine.runlog import (CHECKPOINT_NAME, append_epoch, append_jsonl, final_record, plain, sweep_temp_files,
                                write_json_atomic)
from mdeq.engine.step import (batch_accuracy, gradient_inputs, phase_at, request_jacobian, set_phase, solver_stats,
                              training_objective)

__all__ = ["train_step", "train_one_epoch", "evaluate", "main"]


_STEP_METERS = ("loss", "acc", "nfe_forward", "nfe_backward", "rel_residual_forward", "abs_residual_forward",
                "converged_forward", "rel_residual_backward", "converged_backward", "step_time_ms")



def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, targets: torch.Tensor, *, scaler: torch.amp.GradScaler | None = None,
               autocast: contextlib.AbstractContextManager | None = None, jac_weight: float = 0.0,
               correction_gamma: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward, backward and optimiser step; returns (detached loss, detached logits).

    The loss returned is the task loss at the returned state; the backward runs on ``training_objective``
    (the same tensor unless fixed-point correction or a Jacobian penalty requested by the caller through
    ``model.deq.jacobian_probes`` is on). The scheduler is stepped by the caller. With DDP the gradient
    all-reduce happens inside backward. The backward computes gradients only for the optimiser's
    parameters (``gradient_inputs``).
    """
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = model(images)
        loss = criterion(logits, targets)
        objective = training_objective(unwrap_model(model), criterion, loss, targets, jac_weight=jac_weight,
                                       correction_gamma=correction_gamma)
    optimizer.zero_grad(set_to_none=True)
    inputs = gradient_inputs(optimizer)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(objective).backward(inputs=inputs)
        scaler.step(optimizer)
        scaler.update()
    else:
        objective.backward(inputs=inputs)
        optimizer.step()
    return loss.detach(), logits.detach()



def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    loader: DataLoader, state: TrainState, ctx: Context) -> MetricLogger:
    """Run the rest of epoch ``state.epoch`` (from batch ``state.step_in_epoch``); returns the epoch's meters.

    Each step picks the phase from the global step, steps the scheduler, records NFE and residuals,
    appends to ``steps.jsonl`` every ``log_every`` steps and checkpoints every ``checkpoint_every`` steps.
    Stops early when ``options.max_steps`` is reached.
    """
    cfg, options, device = ctx.cfg, ctx.options, ctx.device
    core = unwrap_model(model)
    model.train()
    if hasattr(core, "deq"):
        core.deq.warn = False  # non-convergence is logged as data (converged_*), not warned every step
    meters = MetricLogger()
    t_start, before = time.perf_counter(), state.epoch_seconds  # before: this epoch's earlier chunks

    def keep_epoch_so_far() -> None:  # what a checkpoint of a part-trained epoch carries over a resume
        state.meters = {n: (m.count, m.total) for n, m in meters.meters.items()}
        state.epoch_seconds = before + time.perf_counter() - t_start

    for name, (count, total) in state.meters.items():  # the part of this epoch done before a resume
        meters.meters[name] = SmoothedValue(meters.window_size)
        meters.meters[name].count, meters.meters[name].total = int(count), float(total)
    bar = progress.bar(total=ctx.iterations_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch}",
                       show=options.progress if ctx.dist.is_main else False, leave=False)
    steps_path = ctx.out_dir / "steps.jsonl"
    batches = iter(loader)
    while True:
        reason = ctx.stop.reason(1.5 * ctx.stop.step_s)
        if reason is not None:  # before the next batch is drawn: the same state as a checkpoint after a step
            keep_epoch_so_far()
            ctx.save(state)
            state.stopped = reason
            break
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        phase = set_phase(model, cfg, state.global_step)
        if phase == "implicit" and state.global_step == cfg.train.pretrain_steps and cfg.train.pretrain_steps > 0:
            log(f"step {state.global_step}: unrolled warm-up done, switching to the implicit solve "
                f"(grad={cfg.solver.grad})")
            if device.type == "cuda":
                torch.cuda.empty_cache()  # as the released code does at the switch
        log_now = (state.global_step + 1) % options.log_every == 0 or state.global_step == 0
        if hasattr(core, "deq"):
            core.deq.measure_unrolled = log_now  # one extra f call, only on logged steps
        jac_weight = request_jacobian(core, cfg.train, state)
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        images = images.to(device, non_blocking=True, memory_format=ctx.memory_format)
        targets = targets.to(device, non_blocking=True)
        loss, logits = train_step(model, criterion, optimizer, images, targets, scaler=ctx.scaler,
                                  autocast=ctx.autocast, jac_weight=jac_weight,
                                  correction_gamma=cfg.solver.correction_gamma)
        if jac_weight:
            core.deq.jacobian_probes = 0
        scheduler.step()
        loss_value = loss.item()  # synchronises the device, so the step time below is complete
        step_ms = 1000.0 * (time.perf_counter() - t0)
        ctx.stop.observe_step(step_ms / 1000.0)
        if not math.isfinite(loss_value):
            kept = (ctx.guard.kept(state) if ctx.guard is not None
                    else f"last checkpoint: {ctx.out_dir / CHECKPOINT_NAME}")
            raise FloatingPointError(f"non-finite training loss {loss_value} at step {state.global_step} "
                                     f"(epoch {state.epoch}, phase {phase}); {kept}")
        if ctx.guard is not None:
            ctx.guard.check_loss(loss_value, state)
        state.global_step += 1
        state.step_in_epoch += 1
        if log_now and ctx.guard is not None:
            ctx.guard.check_parameters(core, state)
        stats = solver_stats(core)
        if cfg.train.jac_reg:
            stats.update(jac_reg_applied=float(jac_weight > 0), jac_reg_weight=jac_weight)
        acc = batch_accuracy(logits, targets)
        meters.update(n=images.shape[0], loss=loss_value, acc=acc)
        meters.update(step_time_ms=step_ms, **stats)
        bar.update(1)
        if bar.disable is False:
            bar.set_postfix(loss=f"{loss_value:.3f}", phase=phase, nfe=stats.get("nfe_forward", float("nan")))
        if log_now and ctx.dist.is_main:
            record = {"step": state.global_step, "epoch": state.epoch, "iter": state.step_in_epoch, "phase": phase,
                      "loss": loss_value, "acc": acc, "lr": lr, **stats, "step_time_ms": step_ms,
                      "peak_mem_mb": ctx.memory.peak_mb(), "mem_kind": ctx.memory.kind}
            append_jsonl(steps_path, record)
            if bar.disable:
                log(f"epoch {state.epoch} [{state.step_in_epoch}/{ctx.iterations_per_epoch}] step {state.global_step} "
                    f"{phase} loss {loss_value:.4f} acc {acc:.1f} lr {lr:.3g} nfe {stats.get('nfe_forward', 0):.0f}"
                    f"/{stats.get('nfe_backward', 0):.0f} rel {stats.get('rel_residual_forward', float('nan')):.3g} "
                    f"{step_ms:.0f} ms" + (f" jac {stats['jac_reg_loss']:.3g}" if "jac_reg_loss" in stats else ""))
        done = options.max_steps is not None and state.global_step >= options.max_steps
        end_of_epoch = state.step_in_epoch >= ctx.iterations_per_epoch
        if (options.checkpoint_every and state.global_step % options.checkpoint_every == 0
                and not end_of_epoch and not done):
            keep_epoch_so_far()
            ctx.save(state)
        if done:
            break
    bar.close()
    state.epoch_seconds = before + time.perf_counter() - t_start
    return meters



@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, num_classes: int, device: torch.device,
             criterion: nn.Module | None = None, autocast=None, equilibrium: bool = True,
             memory_format: torch.memory_format = torch.contiguous_format,
             spectral_radius_iters: int = 0) -> dict[str, Any]:
    """Evaluate on this process's shard and reduce over processes.

    Classification: ``top1``, ``top5`` (%), ``loss``; segmentation: ``miou`` (fraction), ``pixel_acc`` (%),
    ``iou`` per class, ``loss``. Also ``nfe_forward`` and ``rel_residual_forward`` (means over batches), and
    with ``spectral_radius_iters`` > 0 ``spectral_radius``: the batch mean of the power-method estimate of
    rho(J_f(z*)) on each process's first batch (averaged over processes).
    With ``equilibrium`` (the default) the implicit layer solves for the equilibrium even if the
    warm-up mode is set (released old code); ``equilibrium=False`` evaluates a model trained only as
    a weight-tied unrolled stack (``solver.grad: unrolled``, Table 2's unrolled row) as that stack.
    """
    core = unwrap_model(model)
    was_training = core.training
    core.eval()
    deq = getattr(core, "deq", None)
    old_grad = deq.grad if deq is not None else None
    if deq is not None and old_grad == "unrolled" and equilibrium:
        deq.grad = "ift"  # under no_grad every implicit mode returns z*
    confusion = None
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, n, top1, top5, batches
    solver = torch.zeros(3, dtype=torch.float64, device=device)  # nfe, rel residual, batches with a solve
    radius = torch.zeros(2, dtype=torch.float64, device=device)  # sum of batch means, batches
    sr_iters = spectral_radius_iters if deq is not None else 0
    pending = bool(sr_iters)  # the power method runs on the first batch only
    try:
        for images, targets in loader:
            if deq is not None:
                deq.spectral_radius_iters = sr_iters if pending else 0
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with autocast if autocast is not None else contextlib.nullcontext():
                logits = core(images)
                loss = criterion(logits, targets) if criterion is not None else None
            n = targets.shape[0]
            if loss is not None:
                sums[0] += float(loss) * n
            sums[1] += n
            sums[4] += 1
            if targets.dim() == 1:
                c1, c5 = topk_correct(logits.float(), targets, (1, 5))
                sums[2] += c1
                sums[3] += c5
            else:
                if confusion is None:
                    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
                pred = upsample_logits(logits.float(), targets.shape[-2:]).argmax(1)
                confusion.update(targets, pred)
            st = solver_stats(core)
            if "nfe_forward" in st:
                solver[0] += st["nfe_forward"]
                solver[1] += st.get("rel_residual_forward", 0.0)
                solver[2] += 1
            info = getattr(core, "last_info", None)
            if pending and info is not None and info.spectral_radius is not None:
                radius[0] += float(info.spectral_radius.mean())
                radius[1] += 1
                pending = False
    finally:
        if deq is not None:
            deq.grad = old_grad
            deq.spectral_radius_iters = 0
        core.train(was_training)
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(solver)
    n = max(sums[1].item(), 1.0)
    result: dict[str, Any] = {"samples": int(sums[1].item()),
                              "loss": sums[0].item() / n if criterion is not None else math.nan}
    if solver[2] > 0:
        result["nfe_forward"] = solver[0].item() / solver[2].item()
        result["rel_residual_forward"] = solver[1].item() / solver[2].item()
    if sr_iters:
        distributed.all_reduce_sum(radius)
        if radius[1] > 0:
            result["spectral_radius"] = radius[0].item() / radius[1].item()
    segmentation = confusion is not None
    if distributed.get_world_size() > 1:  # every process must take part in the same reductions
        flag = torch.tensor([1.0 if confusion is not None else 0.0], device=device)
        segmentation = distributed.all_reduce_sum(flag).item() > 0
    if segmentation:
        if confusion is None:
            confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
        confusion.ensure(device)
        confusion.reduce_from_all_processes()
        r = confusion.compute()
        result.update(miou=r["miou"], pixel_acc=r["pixel_acc"], iou=r["iou"])
    else:
        result.update(top1=100.0 * sums[2].item() / n, top5=100.0 * sums[3].item() / n)
    return result



def _train_epochs(model, core, criterion, optimizer, scheduler, sampler, train_set, eval_loader, state, ctx,
                  batch, metric, eval_name, source_label) -> dict:
    """Epochs until the last one, ``max_steps`` or a stop (``StopRule``); returns the final record."""
    cfg, options, device, memory = ctx.cfg, ctx.options, ctx.device, ctx.memory
    iterations_per_epoch, dist_info, out_dir = ctx.iterations_per_epoch, ctx.dist, ctx.out_dir
    autocast, rank = ctx.autocast, dist_info.rank
    partial = state.step_in_epoch > 0
    while state.epoch < cfg.train.epochs:
        if options.max_steps is not None and state.global_step >= options.max_steps:
            break
        epoch = state.epoch
        sampler.set_epoch(epoch, skip=min(state.step_in_epoch * batch, sampler.num_samples))
        loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=options.workers,
                            pin_memory=device.type == "cuda", drop_last=False,
                            generator=loader_generator(cfg.train.seed, epoch, rank))
        set_phase(model, cfg, state.global_step)
        phase_start = phase_at(core, cfg, state.global_step - state.step_in_epoch)  # also after a mid-epoch resume
        memory.reset()
        meters = train_one_epoch(model, criterion, optimizer, scheduler, loader, state, ctx)
        epoch_time = state.epoch_seconds  # also the part trained before a resume
        if state.stopped is None and state.step_in_epoch >= iterations_per_epoch:
            eval_estimate = ctx.stop.eval_s if ctx.stop.eval_s is not None else 0.5 * len(eval_loader) * ctx.stop.step_s
            state.stopped = ctx.stop.reason(1.2 * eval_estimate)
            if state.stopped is not None:  # the epoch is trained; its evaluation runs after the resume
                state.meters = {n: (m.count, m.total) for n, m in meters.meters.items()}
                ctx.save(state)
        if state.stopped is not None:
            log(f"stopped ({state.stopped}) at step {state.global_step}, epoch {state.epoch} batch "
                f"{state.step_in_epoch}/{iterations_per_epoch}; checkpoint {out_dir / CHECKPOINT_NAME} written; "
                f"to continue: {resume_hint(options)}")
            break
        peak = memory.peak_mb()
        partial = state.step_in_epoch < iterations_per_epoch
        phase_end = phase_at(core, cfg, max(state.global_step - 1, 0))
        phase = phase_start if phase_start == phase_end else f"{phase_start}->{phase_end}"
        meters.synchronize_between_processes(device, names=_STEP_METERS)
        if ctx.guard is not None:
            ctx.guard.check_parameters(core, state)  # diverged weights are not worth an evaluation
        t_eval = time.perf_counter()
        every = cfg.train.spectral_radius_every
        last_eval = evaluate(model, eval_loader, num_classes=cfg.data.num_classes, device=device,
                             criterion=criterion, autocast=autocast, equilibrium=cfg.solver.grad != "unrolled",
                             memory_format=ctx.memory_format,
                             spectral_radius_iters=cfg.train.spectral_radius_iters if every and epoch % every == 0
                             else 0)
        ctx.stop.eval_s = time.perf_counter() - t_eval
        state.last_eval = last_eval
        avg = meters.global_avgs()
        record = {
            "epoch": epoch, "step": state.global_step, "phase": phase,
            "train_loss": avg.get("loss"), "train_acc": avg.get("acc"),
            "eval_top1": last_eval.get("top1"), "eval_top5": last_eval.get("top5"),
            "eval_miou": last_eval.get("miou"), "eval_pixel_acc": last_eval.get("pixel_acc"),
            "eval_loss": last_eval.get("loss"), "lr": optimizer.param_groups[0]["lr"],
            **{k: avg.get(k) for k in ("nfe_forward", "nfe_backward", "rel_residual_forward", "abs_residual_forward",
                                       "converged_forward", "rel_residual_backward", "converged_backward")},
            "eval_nfe_forward": last_eval.get("nfe_forward"),
            "eval_rel_residual_forward": last_eval.get("rel_residual_forward"),
            "eval_spectral_radius": last_eval.get("spectral_radius"),
            "step_time_ms": avg.get("step_time_ms"), "peak_mem_mb": peak, "mem_kind": memory.kind,
            "epoch_time_s": epoch_time, "steps": state.step_in_epoch, "partial": partial,
        }
        value = last_eval.get(metric)
        if value is not None and math.isfinite(value) and (state.best is None or value > state.best["value"]):
            state.best = {"epoch": epoch, "step": state.global_step, "value": value}
        if dist_info.is_main:
            append_epoch(out_dir / "metrics.csv", record)
        shown = f"mIoU {100 * value:.2f}" if metric == "miou" else f"top-1 {value:.2f}%"
        log(f"epoch {epoch} done ({phase}, step {state.global_step}): train loss {avg.get('loss', math.nan):.4f} "
            f"acc {avg.get('acc', math.nan):.2f}; eval {shown}; nfe fwd {avg.get('nfe_forward', math.nan):.1f} "
            f"bwd {avg.get('nfe_backward', math.nan):.1f}; {avg.get('step_time_ms', math.nan):.0f} ms/step; "
            f"peak {peak:.0f} MB ({memory.kind})"
            + (f"; spectral radius {last_eval['spectral_radius']:.3f}" if "spectral_radius" in last_eval else ""))
        if not partial:
            state.epoch += 1
            state.step_in_epoch = 0
        state.meters, state.epoch_seconds = {}, 0.0
        ctx.save(state)
        if partial:
            break

    final = final_record(config=cfg.name, baseline=options.baseline, metric=metric, last_eval=state.last_eval,
                         final_epoch=state.epoch - 1 if not partial else state.epoch, partial=partial,
                         global_step=state.global_step, epochs_planned=cfg.train.epochs, best=state.best,
                         eval_set=eval_name, data_source_label=source_label)
    if state.stopped is not None:  # a chunk of the run, not its end: no final.json
        return {**final, "stopped": state.stopped}
    if dist_info.is_main:
        write_json_atomic(out_dir / "final.json", final)
    log(f"final: {json.dumps(plain({k: final[k] for k in ('metric', 'final_epoch', 'final')}))}; "
        f"wrote {out_dir / 'final.json'}")
    return final



def main(cfg: ExperimentConfig, options: RunOptions) -> dict[str, Any]:
    """Train ``cfg`` with ``options``; returns what ``final.json`` holds (on every process).

    Callable from a notebook: ``main(load_config("cifar10_tiny_smoke"), RunOptions(out_dir=...))``.
    """
    check_baseline(options.baseline)
    if options.baseline is not None and (cfg.train.jac_reg or cfg.train.spectral_radius_every):
        raise ConfigError(f"train.jac_reg_* and train.spectral_radius_every need an implicit layer; the baseline "
                          f"{options.baseline!r} has none")
    dist_info = distributed.init_distributed("cuda" if options.device.startswith("cuda") or
                                             (options.device == "auto" and torch.cuda.is_available()) else "cpu")
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_bench = torch.backends.cudnn.benchmark
    try:
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        device = resolve_device(options.device, dist_info.local_rank)
        if options.keep_freed_memory or (options.keep_freed_memory is None and device.type == "cpu"):
            allocator.keep_freed_memory()
        if options.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the released configs (CUDNN.BENCHMARK true)
        return _main(cfg, options, dist_info, device)
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        torch.backends.cudnn.benchmark = old_bench
        distributed.cleanup()



def _main(cfg: ExperimentConfig, options: RunOptions, dist_info: DistInfo, device: torch.device) -> dict:
    """``_run`` holding the run folder's lock (rank 0 writes every file, so rank 0 holds it)."""
    out_dir = Path(options.out_dir)
    if not dist_info.is_main:
        return _run(cfg, options, dist_info, device, out_dir)
    with run_folder_lock(out_dir):
        swept = sweep_temp_files(out_dir)
        if swept:
            log(f"removed temporary files an earlier writer left in {out_dir}: {', '.join(swept)}")
        return _run(cfg, options, dist_info, device, out_dir)


def _run(cfg: ExperimentConfig, options: RunOptions, dist_info: DistInfo, device: torch.device,
         out_dir: Path) -> dict:
    run = assemble(cfg, options, dist_info, device, out_dir)
    state, ctx = run.state, run.ctx
    try:
        with ctx.stop.signals(enabled=dist_info.world_size == 1):
            final = _train_epochs(run.model, run.core, run.criterion, run.optimizer, run.scheduler, run.sampler,
                                  run.train_set, run.eval_loader, state, ctx, run.batch, run.metric, run.eval_name,
                                  run.source_label)
    except BaseException as err:
        if dist_info.is_main:
            with contextlib.suppress(OSError, ValueError):  # a full disk: the error itself matters more
                end_chunk(out_dir, state, f"error: {type(err).__name__}: {err}"[:300])
        raise
    if dist_info.is_main:
        end_chunk(out_dir, state, state.stopped or ("finished" if state.epoch >= cfg.train.epochs else "max_steps"))
    return final
