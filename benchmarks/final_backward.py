"""What the IFT layer's final backward costs with and without the gradient for its leaf z*.

After the backward solve, autograd carries the root u through the f(z*) call, the injection, the stem and
the head. z* is a leaf that requires grad there (the solve's VJPs need it), so a plain ``loss.backward()``
also computes dL/dz*, one conv input-gradient per scale, and drops it; ``mdeq.engine.loop.train_step`` names the
optimiser's parameters as the backward's inputs instead (``mdeq.engine.step.gradient_inputs``). This times that
final backward both ways on the trained MDEQ-small at batch 128 (random images in [0, 1], channels_last,
``mdeq.engine.allocator`` on, as ``mdeq.train`` runs on a CPU), alternating the two, and checks that the
parameter gradients are the same bits.

    python benchmarks/final_backward.py   # results/benchmarks/final_backward_cpu.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, out_path, provenance, timeit, trained_model, trained_parser, write_json  # noqa: E402


def main(argv=None) -> None:
    args = trained_parser(__doc__.split("\n\n")[0], "final_backward_cpu.json",
                          "timed calls per variant and round").parse_args(argv)
    from mdeq.engine.build import build_optimizer
    from mdeq.engine.step import set_phase

    cfg, model = trained_model(args)
    set_phase(model, cfg, cfg.train.pretrain_steps)
    optimizer = build_optimizer(model, cfg.train)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, *cfg.data.image_size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.data.num_classes, (args.batch,), generator=g)

    # The graph of the final backward, as the layer builds it: z* (a leaf) -> f(z*) -> head -> loss.
    xs = model.stem(x)
    injection = model.injection(xs)
    prepared = model.f.prepare(args.batch, injection)
    with torch.no_grad():
        z_star, _ = model.equilibrium(x)
    z_star = [t.detach().requires_grad_() for t in z_star]
    loss = torch.nn.functional.cross_entropy(model.head(model.f(z_star, injection, prepared)), y)

    def backward(inputs):
        return lambda: torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)

    with_z = backward(params + z_star)
    params_only = backward(params)
    same = all(torch.equal(a, b) for a, b in zip(with_z()[:len(params)], params_only()))
    times = {"with_z_star": [], "params_only": []}
    for _ in range(args.rounds):
        times["with_z_star"] += timeit(with_z, "cpu", args.repeats)
        times["params_only"] += timeit(params_only, "cpu", args.repeats)
    ms = {k: [1000 * t for t in v] for k, v in times.items()}
    med = {k: median(v) for k, v in ms.items()}
    result = {"benchmark": "final_backward", "config": args.config, "batch": args.batch, "weights": args.weights,
              "threads": args.threads, "what": "autograd of the loss through f(z*), head, injection and stem",
              "median_ms": med, "saving_ms": med["with_z_star"] - med["params_only"],
              "ratio": med["with_z_star"] / med["params_only"], "parameter_gradients_identical": same,
              "ms": ms, "provenance": provenance(args, "cpu")}
    print(f"final backward: with dL/dz* {med['with_z_star']:.1f} ms, parameters only {med['params_only']:.1f} ms "
          f"(saves {result['saving_ms']:.1f} ms, ratio {result['ratio']:.3f}); parameter gradients identical: {same}")
    write_json(out_path(args), result)


if __name__ == "__main__":
    main()
