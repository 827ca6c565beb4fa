"""Does Jacobian regularisation keep MDEQ-small's equilibrium easy to reach? A measured demonstration.

Why: in the Table 1 campaign the training solve's forward residual at its budget grew over the epochs
(``studies/equilibrium_over_training.py``), the trouble DEQ users report most (locuslab/deq issues 20 and
26), and the authors' later code regularises ||J_f(z*)||_F (Bai, Koltun, Kolter, ICML 2021). This script
takes the latest committed MDEQ-small checkpoint of the campaign (``results/runs/cifar10_mdeq_small/
checkpoint.pt`` as its last commit holds it, read from git: the campaign keeps rewriting the working tree's
copy) with its optimiser and schedule state, and trains two copies for ``--steps`` optimiser steps on the same
batches and the same dropout masks: one as the campaign trains, one with Jacobian regularisation at the
weight and frequency of the released CIFAR-10 config ``locuslab/deq MDEQ-Vision/experiments/cifar/
cls_mdeq_LARGE_reg.yaml`` (JAC_LOSS_WEIGHT 0.4, JAC_LOSS_FREQ 0.02, JAC_STOP_EPOCH 90, 2 probes; the
draws are ``mdeq.engine.step.jacobian_draw``'s, as a run of the engine would make them at those steps). Before and
after, on one fixed batch of test images, it measures the forward residual at the training budget
(T_f + 1 f evaluations), the f evaluations until the batch-mean residual falls below 1e-3 and 1e-4 (Broyden,
the config's memory, ``--budget`` evaluations), both in eval mode and in train mode with a fixed dropout mask
(``equilibrium_over_training.solve_stats``), and the spectral radius of J_f(z*) by the power method in eval
mode; during training it logs each step's loss, residual, f evaluations, penalty and time. A demonstration
on one checkpoint and a few hundred steps, labelled as such: never a Table 1 number.

    python studies/jacobian_reg_demo.py --threads 2 --steps 300   # results/jacobian_reg_demo.json and .md
    python studies/jacobian_reg_demo.py --render                  # re-draw the .md page part from the JSON

The ``.md`` file is the part of the book's page on training stability (docs/training_stability.md) that
shows the numbers: ``render`` draws it from the JSON alone (or says "not run yet" when there is none).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch
import yaml

from mdeq.engine.cli import parse_kv
from mdeq.engine.paths import ROOT
from mdeq.engine.runlog import script_provenance, write_result_json as write_json
# A sibling study: a script's own folder is on sys.path when it runs (the tests add it).
from equilibrium_over_training import solve_stats

RUN = "results/runs/cifar10_mdeq_small"
OUT = "results/jacobian_reg_demo.json"
RELEASED_REG = "locuslab/deq MDEQ-Vision/experiments/cifar/cls_mdeq_LARGE_reg.yaml"
LABEL = "measured demonstration on one checkpoint, not a Table 1 number"


def committed_checkpoint(run: str, commit: str | None) -> tuple[str, dict]:
    """(commit, checkpoint) of ``<run>/checkpoint.pt`` at ``commit`` (default: the last commit that changed it)."""
    path = f"{run}/checkpoint.pt"
    if commit is None:
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", path], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
        if not commit:
            raise SystemExit(f"no commit holds {path}")
    blob = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True).stdout
    return commit, torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def batch_order(size: int, batch: int, count: int, seed: int) -> list[list[int]]:
    """``count`` batches of ``batch`` indices into a data set of ``size``: seeded permutations, one after another."""
    g, pool = torch.Generator().manual_seed(seed), []
    while len(pool) < batch * count:
        pool += torch.randperm(size, generator=g).tolist()
    return [pool[i * batch:(i + 1) * batch] for i in range(count)]


def load_batch(ds, idx) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def measure(cfg_long, state_dict, x, y, *, train_budget: int, power_iters: int, seed: int) -> dict:
    """Solve difficulty and spectral radius of one set of weights on the evaluation batch."""
    from mdeq.core.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg_long)
    model.load_state_dict(state_dict)
    model.deq.warn = False
    x = x.contiguous(memory_format=torch.channels_last)
    out = {"eval_mode": solve_stats(model, [x], train=False, train_budget=train_budget, seed=seed)}
    model.eval()
    model.deq.spectral_radius_iters = power_iters
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    radius = model.last_info.spectral_radius
    model.deq.spectral_radius_iters = 0
    out["spectral_radius"] = {"mean": float(radius.mean()), "median": float(radius.median()),
                              "max": float(radius.max()), "iters": power_iters,
                              "seconds_with_solve": time.perf_counter() - t0}
    out["eval_batch_loss"] = float(torch.nn.functional.cross_entropy(logits, y))
    out["eval_batch_top1"] = 100.0 * float((logits.argmax(1) == y).float().mean())
    # last: a train-mode forward moves this copy's BatchNorm running statistics
    out["train_mode"] = solve_stats(model, [x], train=True, train_budget=train_budget, seed=seed)
    return out


def train_arm(cfg, ckpt, ds, batches, *, per_epoch: int, seed: int, log_every: int) -> tuple[dict, list[dict]]:
    """``len(batches)`` engine steps from the checkpoint; returns (final state dict, one record per step)."""
    from mdeq.core.model import build_model
    from mdeq.engine.build import build_criterion, build_optimizer, build_scheduler
    from mdeq.engine.loop import train_step
    from mdeq.engine.step import jacobian_draw, jacobian_weight, set_phase, solver_stats

    torch.manual_seed(seed)
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.train()
    model.deq.warn = False
    optimizer = build_optimizer(model, cfg.train)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler = build_scheduler(optimizer, cfg.train, per_epoch)
    scheduler.load_state_dict(ckpt["scheduler"])
    criterion = build_criterion(cfg)
    records = []
    for i, idx in enumerate(batches):
        step = ckpt["global_step"] + i
        epoch = step // per_epoch
        phase = set_phase(model, cfg, step)
        images, targets = load_batch(ds, idx)
        images = images.contiguous(memory_format=torch.channels_last)  # the engine's CPU default
        weight = 0.0
        if cfg.train.jac_reg:
            applied, probe_seed = jacobian_draw(cfg.train, step)
            w = jacobian_weight(cfg.train, step, epoch)
            if applied and w > 0:
                weight = w
                model.deq.jacobian_probes, model.deq.jacobian_seed = cfg.train.jac_reg_probes, probe_seed
        torch.manual_seed(seed * 1_000_003 + i)  # the same dropout masks in both arms
        t0 = time.perf_counter()
        loss, _ = train_step(model, criterion, optimizer, images, targets, jac_weight=weight,
                             correction_gamma=cfg.solver.correction_gamma)
        scheduler.step()
        step_ms = 1000.0 * (time.perf_counter() - t0)
        model.deq.jacobian_probes = 0
        stats = solver_stats(model)
        records.append({"step": step + 1, "phase": phase, "loss": float(loss), "step_time_ms": step_ms,
                        "jac_reg_applied": weight > 0, "jac_reg_weight": weight,
                        **{k: stats[k] for k in ("nfe_forward", "nfe_backward", "rel_residual_forward",
                                                 "abs_residual_forward", "rel_residual_backward", "jac_reg_loss")
                           if k in stats}})
        if (i + 1) % log_every == 0 or i == 0 or i + 1 == len(batches):
            r = records[-1]
            print(f"  step {i + 1}/{len(batches)} loss {r['loss']:.4f} rel {r['rel_residual_forward']:.3g} "
                  f"nfe {r['nfe_forward']:.0f}/{r.get('nfe_backward', 0):.0f} {step_ms:.0f} ms"
                  + (f" jac {r['jac_reg_loss']:.4g} (weight {weight:g})" if weight else ""), flush=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, records


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def summarise(records: list[dict], tail: int) -> dict:
    """Means over all steps and over the last ``tail`` (the logged training residual is the batch mean)."""
    last = records[-tail:]
    applied = [r for r in records if r["jac_reg_applied"]]
    plain = [r for r in records if not r["jac_reg_applied"]]
    return {
        "steps": len(records), "tail_steps": len(last),
        "train_loss_mean": _mean([r["loss"] for r in records]),
        "train_loss_tail_mean": _mean([r["loss"] for r in last]),
        "rel_residual_forward_first_tail_mean": _mean([r["rel_residual_forward"] for r in records[:tail]]),
        "rel_residual_forward_tail_mean": _mean([r["rel_residual_forward"] for r in last]),
        "step_time_ms_mean": _mean([r["step_time_ms"] for r in records]),
        "step_time_ms_median": statistics.median(r["step_time_ms"] for r in records),
        "penalty_steps": len(applied),
        "step_time_ms_mean_with_penalty": _mean([r["step_time_ms"] for r in applied]),
        "step_time_ms_mean_without_penalty": _mean([r["step_time_ms"] for r in plain]),
        "jac_reg_loss_mean": _mean([r.get("jac_reg_loss") for r in applied]),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", default=RUN, help="a run folder whose checkpoint.pt git history holds")
    p.add_argument("--commit", default=None, help="the commit to read the checkpoint from (default: its last)")
    p.add_argument("--data-root", default="data/cifar10-jpeg-q75")
    p.add_argument("--data-option", nargs="*", default=["source=jpeg_q75",
                   "exact_subset=data/cifar10-partial-exact/cifar10_exact_prefix_subset.npz"], metavar="KEY=VALUE")
    p.add_argument("--jac-weight", type=float, default=0.4, help=f"JAC_LOSS_WEIGHT of {RELEASED_REG}")
    p.add_argument("--jac-freq", type=float, default=0.02, help=f"JAC_LOSS_FREQ of {RELEASED_REG}")
    p.add_argument("--jac-stop-epoch", type=int, default=90, help=f"JAC_STOP_EPOCH of {RELEASED_REG}")
    p.add_argument("--jac-probes", type=int, default=2, help="Gaussian probes (the released jac_loss_estimate: 2)")
    p.add_argument("--eval-batch", type=int, default=128, help="test images in the fixed evaluation batch")
    p.add_argument("--budget", type=int, default=50, help="f evaluations of the long solves")
    p.add_argument("--power-iters", type=int, default=150, help="power-method VJPs (the released monitor: 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tail", type=int, default=50, help="steps averaged at the start and the end of training")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", default=OUT, help="relative to the repository root; the page part goes beside it (.md)")
    p.add_argument("--render", action="store_true", help="only re-draw the .md from the JSON (or 'not run yet')")
    args = p.parse_args(argv)
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    if args.render:
        payload = json.loads(out.read_text()) if out.is_file() else None
        out.with_suffix(".md").write_text(render(payload))
        print(f"wrote {out.with_suffix('.md')}")
        return

    from mdeq.engine.allocator import keep_freed_memory
    from mdeq.core.config import config_from_dict, config_to_dict
    from mdeq.engine.data import build_dataset
    from mdeq.paper.measure.solver_traces import trace_overrides

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as mdeq.train does on a CPU
    commit, ckpt = committed_checkpoint(args.run, args.commit)
    cfg = config_from_dict(ckpt["config"])
    reg = dataclasses.replace(cfg.train, jac_reg_freq=args.jac_freq, jac_reg_weight=args.jac_weight,
                              jac_reg_pretrain_weight=0.0, jac_reg_stop_epoch=args.jac_stop_epoch,
                              jac_reg_probes=args.jac_probes)
    arms = {"without": cfg, "with_jacobian_reg": dataclasses.replace(cfg, train=reg)}
    raw = config_to_dict(cfg)
    for item in trace_overrides("broyden", args.budget):  # every solve runs the whole budget
        key, value = item.split("=", 1)
        section, name = key.split(".")
        raw[section][name] = yaml.safe_load(value)
    cfg_long = config_from_dict(raw)
    train_budget = cfg.solver.max_iter + 1

    options = parse_kv(args.data_option)
    train_set = build_dataset("cifar10", ROOT / args.data_root, "train", augment=cfg.data.augment, **options)
    test_set = build_dataset("cifar10", ROOT / args.data_root, "val", **options)
    batches = batch_order(len(train_set), cfg.data.batch_size, args.steps, args.seed)
    per_epoch = math.ceil(len(train_set) / cfg.data.batch_size)  # the run's schedule: one process
    recorded = (ckpt.get("run") or {}).get("iterations_per_epoch", per_epoch)
    if recorded != per_epoch:
        raise SystemExit(f"the checkpoint's run had {recorded} iterations per epoch, this data set gives {per_epoch}")
    eval_idx = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(args.seed))[:args.eval_batch]
    x_eval, y_eval = load_batch(test_set, eval_idx)

    def measured(state):
        return measure(cfg_long, state, x_eval, y_eval, train_budget=train_budget, power_iters=args.power_iters,
                       seed=args.seed)

    print(f"checkpoint {args.run} at {commit[:10]}: step {ckpt['global_step']}, epoch {ckpt['epoch']}", flush=True)
    t0 = time.perf_counter()
    before = measured(ckpt["model"])
    print(f"before: {_line(before)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = {}
    for name, arm_cfg in arms.items():
        print(f"{name}: {args.steps} steps", flush=True)
        t0 = time.perf_counter()
        state, records = train_arm(arm_cfg, ckpt, train_set, batches, per_epoch=per_epoch, seed=args.seed,
                                   log_every=args.log_every)
        train_s = time.perf_counter() - t0
        after = measured(state)
        print(f"{name} after: {_line(after)}", flush=True)
        results[name] = {"after": after, "summary": summarise(records, min(args.tail, len(records))),
                         "train_seconds": train_s, "steps": records}
    off, on = (results[k]["summary"] for k in arms)
    payload = {
        "benchmark": "jacobian_reg_demo", "label": LABEL,
        "checkpoint": {"run": args.run, "commit": commit, "global_step": int(ckpt["global_step"]),
                       "epoch": int(ckpt["epoch"]), "step_in_epoch": int(ckpt["step_in_epoch"])},
        "config": cfg.name, "train_budget_f_evals": train_budget, "long_budget_f_evals": args.budget,
        "jacobian_reg": {"weight": args.jac_weight, "freq": args.jac_freq, "stop_epoch": args.jac_stop_epoch,
                         "pretrain_weight": 0.0, "probes": args.jac_probes, "source": RELEASED_REG,
                         "draws": "mdeq.engine.step.jacobian_draw(train.seed, global step)"},
        "data": {"train": f"{args.steps} batches of {cfg.data.batch_size} CIFAR-10 training images (JPEG-q75 "
                          f"re-encoded, {args.data_root}), seeded order {args.seed}, the same in both arms",
                 "eval": f"{args.eval_batch} CIFAR-10 test images (seeded choice {args.seed})"},
        "measure": "eval_mode/train_mode: batch mean of each sample's lowest-so-far ||f(z) - z|| / ||f(z)|| "
                   "(studies/equilibrium_over_training.py solve_stats; train mode with one fixed dropout mask); "
                   "spectral radius: mdeq.core.stability.power_method at the eval-mode z* of the long solve, per sample",
        "before": before, "arms": results,
        "overhead": {"step_time_mean_ratio": on["step_time_ms_mean"] / off["step_time_ms_mean"],
                     "penalty_step_vs_plain_step_ratio":
                         (on["step_time_ms_mean_with_penalty"] / on["step_time_ms_mean_without_penalty"]
                          if on["penalty_steps"] and on["step_time_ms_mean_without_penalty"] else None)},
        "output": _relative(out),
        "provenance": script_provenance(args, "cpu", folder="studies"),
    }
    write_json(out, payload)
    out.with_suffix(".md").write_text(render(payload))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _line(m: dict) -> str:
    e = m["eval_mode"]
    return (f"eval-mode residual at the training budget {e['lowest_rel_residual_at_training_budget']:.3g}, "
            f"f evals to 1e-4 {e['f_evals_to_0.0001']}, spectral radius {m['spectral_radius']['mean']:.4f}")


# ----------------------------------------------------------------------------------------------
# The page part: docs/training_stability.md includes the .md this draws from the JSON alone.

def _fmt(v, none="-", spec=".3g"):
    if v is None:
        return none
    return format(v, spec) if isinstance(v, float) else str(v)


def render(payload: dict | None) -> str:
    """The Markdown table of the demonstration, drawn from its JSON (no number typed by hand)."""
    if payload is None:
        return ("**Not run yet.** The demonstration is `python studies/jacobian_reg_demo.py --threads 2 "
                "--steps 300`; it writes `results/jacobian_reg_demo.json` and redraws this part of the page "
                "from it.\n")
    b, arms = payload["before"], payload["arms"]
    off, on = arms["without"], arms["with_jacobian_reg"]
    ck, reg, prov = payload["checkpoint"], payload["jacobian_reg"], payload["provenance"]
    cols = [b, off["after"], on["after"]]
    tb = payload["train_budget_f_evals"]
    at_budget = "lowest_rel_residual_at_training_budget"
    rows = [
        (f"forward residual after {tb} f evaluations, eval mode", [c["eval_mode"][at_budget] for c in cols]),
        (f"forward residual after {tb} f evaluations, train mode", [c["train_mode"][at_budget] for c in cols]),
        ("f evaluations to 1e-4, eval mode", [c["eval_mode"]["f_evals_to_0.0001"] for c in cols]),
        ("f evaluations to 1e-4, train mode", [c["train_mode"]["f_evals_to_0.0001"] for c in cols]),
        ("f evaluations to 1e-3, eval mode", [c["eval_mode"]["f_evals_to_0.001"] for c in cols]),
        ("spectral radius of J_f(z*), batch mean (max)",
         [f"{c['spectral_radius']['mean']:.4f} ({c['spectral_radius']['max']:.4f})" for c in cols]),
        ("loss on the evaluation batch", [c["eval_batch_loss"] for c in cols]),
    ]
    s_off, s_on = off["summary"], on["summary"]
    train_rows = [
        ("train loss, mean over all steps", s_off["train_loss_mean"], s_on["train_loss_mean"]),
        (f"train loss, mean over the last {s_on['tail_steps']}", s_off["train_loss_tail_mean"],
         s_on["train_loss_tail_mean"]),
        (f"logged forward residual (training solve), first {s_on['tail_steps']} steps",
         s_off["rel_residual_forward_first_tail_mean"], s_on["rel_residual_forward_first_tail_mean"]),
        (f"logged forward residual (training solve), last {s_on['tail_steps']} steps",
         s_off["rel_residual_forward_tail_mean"], s_on["rel_residual_forward_tail_mean"]),
        ("steps with the penalty", s_off["penalty_steps"], s_on["penalty_steps"]),
        ("step time, mean (ms)", _ms(s_off["step_time_ms_mean"]), _ms(s_on["step_time_ms_mean"])),
        ("step time of a penalty step, mean (ms)", _ms(s_off["step_time_ms_mean_with_penalty"]),
         _ms(s_on["step_time_ms_mean_with_penalty"])),
    ]
    ov = payload["overhead"]
    label = payload["label"][:1].upper() + payload["label"][1:]
    lines = [
        f"*{label}.* MDEQ-small (`{payload['config']}`) from the Table 1 campaign's "
        f"checkpoint at step {ck['global_step']} (epoch {ck['epoch']}, commit `{ck['commit'][:10]}`), trained "
        f"{s_on['steps']} more steps on the same batches and dropout masks without and with Jacobian "
        f"regularisation (weight {reg['weight']:g}, frequency {reg['freq']:g}, {reg['probes']} probes: "
        f"`{reg['source']}`). Hardware: {_hardware(prov)}; {prov['date']}; `{prov['command']}`.",
        "",
        f"On the fixed evaluation batch ({payload['data']['eval']}; long solves of {payload['long_budget_f_evals']} "
        "f evaluations, Broyden):",
        "",
        "| measure | before | after, without | after, with Jacobian reg. |",
        "| --- | --- | --- | --- |",
        *[f"| {name} | {' | '.join(_fmt(v, 'not reached') for v in vals)} |" for name, vals in rows],
        "",
        "During the training steps:",
        "",
        "| measure | without | with Jacobian reg. |",
        "| --- | --- | --- |",
        *[f"| {name} | {_fmt(a)} | {_fmt(c)} |" for name, a, c in train_rows],
        "",
        f"Step-time overhead of the regularised run: mean step time {ov['step_time_mean_ratio']:.3f}x the "
        f"unregularised run's; " + _penalty_step_cost(s_on, ov) + f" Source: `{payload.get('output', OUT)}`.",
        "",
        "What it showed, computed from the same JSON (one checkpoint, one seed, one evaluation batch: a difference "
        "of the size that two runs on other batches would show is not measured here):",
        "",
        *[f"- {line}" for line in _findings(b, off, on)],
        "",
    ]
    return "\n".join(lines)


def _penalty_step_cost(s_on: dict, ov: dict) -> str:
    if not s_on["penalty_steps"]:
        return "no step drew the penalty."
    if ov["penalty_step_vs_plain_step_ratio"] is None:
        return "every step had the penalty."
    return f"a step with the penalty took {ov['penalty_step_vs_plain_step_ratio']:.2f}x a step without it."


def _change(without, with_reg, spec: str = ".3g") -> str:
    """'A without, B with (p % lower)': the regularised run against the unregularised one."""
    a, b = _fmt(without, "not reached", spec), _fmt(with_reg, "not reached", spec)
    if without is None or with_reg is None:
        return f"{a} without, {b} with the regulariser"
    if without == with_reg:
        return f"{a} in both"
    rel = 100.0 * (with_reg - without) / abs(without)
    return f"{a} without, {b} with the regulariser ({abs(rel):.1f} % {'lower' if rel < 0 else 'higher'})"


def _findings(before: dict, off: dict, on: dict) -> list[str]:
    a0, a1 = off["after"], on["after"]
    key = "lowest_rel_residual_at_training_budget"
    s0, s1 = off["summary"], on["summary"]
    return [
        f"forward residual at the training budget (eval mode): {_fmt(before['eval_mode'][key])} before; after: "
        + _change(a0["eval_mode"][key], a1["eval_mode"][key]),
        f"f evaluations to 1e-4 (eval mode): {_fmt(before['eval_mode']['f_evals_to_0.0001'], 'not reached')} "
        "before; after: " + _change(a0["eval_mode"]["f_evals_to_0.0001"], a1["eval_mode"]["f_evals_to_0.0001"]),
        f"spectral radius (batch mean): {before['spectral_radius']['mean']:.4f} before; after: "
        + _change(a0["spectral_radius"]["mean"], a1["spectral_radius"]["mean"], ".4f"),
        f"train loss over the last {s1['tail_steps']} steps: "
        + _change(s0["train_loss_tail_mean"], s1["train_loss_tail_mean"]),
        f"Jacobian penalty applied in {s1['penalty_steps']} of {s1['steps']} steps"
        + (f", mean estimate of ||J||_F^2 / numel {_fmt(s1.get('jac_reg_loss_mean'))}" if s1["penalty_steps"]
           else ""),
    ]


def _ms(v):
    return None if v is None else f"{v:.0f}"


def _hardware(prov: dict) -> str:
    from mdeq.engine.runlog import describe_hardware
    return describe_hardware(prov.get("hardware"))


if __name__ == "__main__":
    main()
