"""The training engine: how one run trains, evaluates, checkpoints and leaves its folder on disk.

Modules, in the order a step meets them: ``options`` (RunOptions, TrainState), ``loaders`` (data sets and
resumable samplers; the data sets themselves are ``data/``, the Table 1 baselines ``baselines/``),
``build`` (optimiser, schedule, loss, network, the checkpoint writer, ``assemble``), ``step`` (the phase,
the objective, the solver statistics), ``loop`` (``train_step``, ``train_one_epoch``, ``evaluate``,
``main``), ``guards`` (divergence, deadlines, signals), ``rundir`` (one writer, resume), ``runlog`` (the
files a run leaves), ``checkpoint``, ``metrics``, ``distributed``, ``progress``, ``allocator``, ``paths``,
``cli`` (what the commands share). Imports ``mdeq.core`` and nothing of ``mdeq.paper``;
``mdeq.engine.data`` imports nothing else of the engine. ``python -m mdeq.train`` is its command line.

Why this shape: torchvision's ``references/classification/train.py`` (a plain loop, full-state
checkpoints), with what the paper's training needs on top (Appendix A, Table 4,
``docs/paper_vs_released.md``):

- **Optimisers and schedule** from ``cfg.train``: torch Adam (L2-coupled weight decay, not AdamW) for
  CIFAR-10, SGD with momentum 0.9 (+ Nesterov for ImageNet) for ImageNet and Cityscapes, and
  ``CosineAnnealingLR(T_max = iterations per epoch x epochs, eta_min)`` stepped every iteration.
- **Unrolled warm-up**: for the first ``train.pretrain_steps`` optimiser steps f_theta is applied
  ``solver.unroll_steps`` times with ordinary backprop (``model.deq.grad = "unrolled"``); from then on
  the implicit solve with ``solver.grad`` runs. A hard switch, counted in optimiser steps and derived
  from the global step, so a resumed run lands in the right phase. Evaluation always solves for the
  equilibrium, as the released (old) code does, also during the warm-up.
- **Losses and metrics**: cross-entropy; for Cityscapes class-weighted with ignore index 255, the
  logits upsampled bilinearly (align_corners=True) to the label size. Top-1/top-5 accuracy, or mIoU
  from a confusion matrix reduced over processes.
- **No model selection on the evaluation set.** CIFAR-10's evaluation set is its test set (as in the
  released code, whose ``model_best`` is chosen on it). We report the *final* epoch; ``final.json``
  shows the best epoch beside it, labelled as such, for comparison only.
- **ImageNet initialisation for Cityscapes** (``train.pretrained``): every tensor present in both state
  dicts with equal shapes (stem, injection, f_theta) is loaded and the loaded/skipped keys are logged.
- **Stabilisers of the authors' later code**, off by default (docs/training_stability.md): Jacobian
  regularisation (``train.jac_reg_*``, scheduled by ``jacobian_weight``), fixed-point correction
  (``solver.correction_*``, ``training_objective``) and a spectral-radius monitor at evaluation
  (``train.spectral_radius_*``, the ``eval_spectral_radius`` column).

Run-time options (device, mixed precision, workers, logging, output folder, resume, limits for smoke
runs) are not part of the experiment and live in ``RunOptions``, not in the config.

Mixed precision (``--amp``, off by default): f, the stem and the heads run under ``torch.autocast``
(float16 on CUDA with a ``GradScaler``, or bfloat16, which needs no scaler); the solver keeps its state
and residuals in the dtype of z0 and casts f's output to it (``mdeq/core/solver_common.py``). On a CPU ``--amp``
means bfloat16 autocast. Code behind ``torch.cuda.is_available()`` never runs on a CPU-only machine.

Multi-GPU and multi-node: launch with ``torchrun`` (``torchrun --nproc_per_node 4 -m mdeq.train ...``);
``mdeq.engine.distributed`` reads the rank and world size from its environment. The model is wrapped in
DistributedDataParallel, each process reads its shard through a ``DistributedSampler`` (reshuffled
every epoch from ``train.seed + epoch``), ``data.batch_size`` is the global batch, and segmentation
models use SyncBatchNorm on GPUs as the released code does (SyncBatchNorm has no CPU kernel). Only rank
0 logs and writes files. The implicit backward (a custom autograd Function that calls
``autograd.grad`` with respect to z* only) leaves DDP's per-parameter gradient hooks firing exactly
once per step in both phases; ``tests/test_distributed.py`` checks the gradients against one process.

Outputs in ``options.out_dir``: ``metrics.csv`` (one row per epoch), ``steps.jsonl`` (every
``log_every`` steps), ``provenance.json``, ``checkpoint.pt`` (atomic; every ``checkpoint_every`` steps
and at each epoch's end) and ``final.json``. ``--resume`` continues from ``checkpoint.pt`` mid-epoch:
the RNG states, the sampler's epoch and the number of batches already consumed are restored, so with
``workers=0`` on a CPU a killed and resumed run ends bit-identical to an uninterrupted one.

A run folder has one writer: ``<out>/.lock`` is held (``flock``, released by the OS when the process
dies) from before anything is read until the end. A start without ``--resume`` in a folder holding a
run's files is refused, and a resume must match the checkpoint in everything that shapes the schedule
and the data (config, limits, processes). A diverging run stops before its checkpoint is overwritten
(``guards.DivergenceGuard``). ``python -m mdeq.train`` ends every error in one line (exit code 2 for bad
input, 1 for a fault; ``--traceback`` or ``MDEQ_TRACEBACK=1`` shows the stack).
"""
