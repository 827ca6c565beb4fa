"""The training engine: how one run trains, evaluates and leaves its folder on disk.

The loop, its options and guards, the run folder and the logs it holds, checkpoints, data sets,
baselines, metrics and distributed training. Imports ``mdeq.core`` and nothing of ``mdeq.paper``;
``mdeq.engine.data`` imports nothing else of the engine. ``python -m mdeq.train`` is its command line.
"""
