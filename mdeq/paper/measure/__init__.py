"""What is computed for a figure: Fig. 4b's time and memory, the solver traces of Figs. 5-7, Fig. 8's predictions.

One module per figure, each answering its one question:

- ``runtime``: how long a training step and an inference pass take (Fig. 4b, time);
- ``memory``: how many bytes of tensors a training step keeps alive (Fig. 4b, memory);
- ``solver_traces``: how the solvers converge, forward and backward, and per scale (Figs. 5-7);
- ``examples``: what the Cityscapes MDEQ predicts (Fig. 8);
- ``timing``: what they share: the one timing loop, the full profile's GPU check.

Why one package: the notebooks, the device scripts (``scripts/device/``) and the benchmarks
(``benchmarks/``) measure with the same code, so a number means the same wherever it is drawn. Each
function returns plain data (or writes images) and draws nothing; ``mdeq.paper.report`` draws. The device is
chosen once, by the engine's rule (``mdeq.engine.build.resolve_device``).
"""
