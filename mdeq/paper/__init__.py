"""The reproduction of the paper: which runs make each table and figure, and how they are measured and drawn.

The run registry, the measurements behind the figures, the notebooks' helpers and the reports. Imports
``mdeq.engine`` and ``mdeq.core``; the commands ``python -m mdeq.campaign``, ``mdeq.reproduce``,
``mdeq.evaluate`` and ``mdeq.smoke`` sit above it.
"""
