"""How the results are drawn: the paper-vs-ours tables (``tables``), the paper's figures (``plots``), the figures
of our measurements beyond the paper (``beyond``), their style (``style``).

Why one package: the three profiles of every notebook (``smoke``, ``logs``, ``full``) draw the same tables
and figures from the same kind of logs, so the drawing lives here once and is tested
(``tests/test_report.py``). It reads run logs through ``mdeq.engine.runlog`` and measurements as the plain
dicts ``mdeq.paper.measure`` returns; it computes nothing and writes nothing (``mdeq.paper.notebook`` saves).
Paper numbers come from ``results/paper_numbers.yaml`` and stay labelled as the paper's; a row without
our log says "not run yet", never the paper's number.
"""
