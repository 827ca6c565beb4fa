"""When must a run stop early: divergence, its wall-clock deadline, or a signal.

Why: a diverging run must stop before its weights overwrite the last good checkpoint, and a chunk of a
campaign must end with a checkpoint before its deadline instead of being killed mid-step.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn

from mdeq.engine.distributed import log
from mdeq.engine.options import TrainState

__all__ = ["DivergenceError", "DivergenceGuard", "StopRule"]


class DivergenceError(FloatingPointError):
    """Training diverged (loss or parameters far beyond a healthy run's); the last checkpoint is kept."""



class DivergenceGuard:
    """Stops a diverging run before diverged weights overwrite the last good checkpoint.

    Why: a non-finite loss was the only check, so Adam at lr 1e6 trained to the end at a loss of 1e6 with
    weights of 6e29. The bounds are far from any healthy run: a step's loss above ``factor`` times the
    run's reference loss (the mean of its first ``REFERENCE_STEPS`` losses, and at least ln(num_classes),
    the loss of a uniform prediction), or a parameter above ``max_param_abs`` in magnitude or not finite.
    The loss is checked every step, the parameters on logged steps, before an evaluation and before
    every checkpoint.
    """

    REFERENCE_STEPS = 20

    def __init__(self, factor: float | None, max_param_abs: float | None, num_classes: int, ckpt_path: Path):
        self.factor, self.max_param_abs, self.ckpt_path = factor, max_param_abs, ckpt_path
        self.floor = math.log(max(2, num_classes))

    def reference(self, state: TrainState) -> float:
        n, total = state.loss_reference
        return max(total / n if n else 0.0, self.floor)

    def check_loss(self, loss: float, state: TrainState) -> None:
        """Call with each finite training loss, before the step is counted."""
        ref = self.reference(state)
        if self.factor is not None and loss > self.factor * ref:
            raise DivergenceError(
                f"training diverged at step {state.global_step + 1} (epoch {state.epoch}): loss {loss:.4g} is more "
                f"than {self.factor:g}x the run's reference loss {ref:.4g}; {self.kept(state)}; lower train.lr, "
                f"or pass --divergence-factor with a larger bound")
        n, total = state.loss_reference
        if n < self.REFERENCE_STEPS:
            state.loss_reference = (n + 1, total + loss)

    def check_parameters(self, model: nn.Module, state: TrainState) -> None:
        peaks = [p.detach().abs().max().float() for p in model.parameters() if p.numel()]
        if not peaks:
            return
        peak = torch.stack(peaks).max().item()
        if not math.isfinite(peak) or (self.max_param_abs is not None and peak > self.max_param_abs):
            bound = "not finite" if not math.isfinite(peak) else f"above the bound {self.max_param_abs:g}"
            raise DivergenceError(
                f"training diverged by step {state.global_step} (epoch {state.epoch}): a parameter is {peak:.4g} "
                f"({bound}); {self.kept(state)}; lower train.lr, or pass --max-param-abs with a larger bound")

    def kept(self, state: TrainState) -> str:
        if state.checkpoint_step is None:
            return "no checkpoint was written"
        return f"the checkpoint {self.ckpt_path} (step {state.checkpoint_step}) is kept"



class StopRule:
    """When a chunk must end: before a step or an evaluation that would pass ``stop_at``, or after a signal.

    SIGTERM and SIGINT (single process only) ask for a clean stop at the next step: a checkpoint is
    written and the process exits; a second SIGINT interrupts at once.
    """

    def __init__(self, stop_at: float | None):
        self.stop_at = stop_at
        self.signal: str | None = None
        self.step_s = 0.0        # running estimate of one training step
        self.eval_s: float | None = None  # the last evaluation's duration in this process

    def observe_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s == 0.0 else max(seconds, 0.8 * self.step_s + 0.2 * seconds)

    def reason(self, upcoming_s: float) -> str | None:
        if self.signal is not None:
            return self.signal
        if self.stop_at is not None and time.time() + upcoming_s > self.stop_at:
            return "stop_at"
        return None

    @contextlib.contextmanager
    def signals(self, enabled: bool):
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = name
            log(f"{name}: stopping at the next step with a checkpoint (SIGINT again to interrupt at once)")

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
