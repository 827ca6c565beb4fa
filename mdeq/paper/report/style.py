"""How the tables and figures look and name what they show: colours, the matplotlib style, curve and solver labels.

One colour per model or solver and one line style per curve, the same in every figure; one matplotlib style for
every figure of the repository; the words a table or figure uses for a smoke run (``SMOKE_NOTE``) and for a row
or panel without our log (``NOT_RUN``); and the names of solvers, curves and data sets that a table's rows and a
figure's legend share; and how a table is laid out on a page (``PageTable``).
"""
from __future__ import annotations

import html
import os
import textwrap
from dataclasses import dataclass
from typing import Mapping

import matplotlib
import pandas as pd

__all__ = ["SMOKE_NOTE", "NOT_RUN", "BEST", "COLORS", "set_style", "figure_title", "no_data", "PageTable"]

SMOKE_NOTE = "smoke run, not a reproduction"
NOT_RUN = "not run yet"
SVG_HASHSALT = "mdeq-repro"  # the SVG ids depend on the drawing only, not on a random salt


COLORS = {  # one colour per model or solver, in every figure
    "mdeq": "#1f77b4", "mdeq_small": "#1f77b4", "mdeq_small_simple_injection": "#17becf", "mdeq_large": "#08306b", "mdeq_xl": "#6baed6",
    "mdeq_large_unrolled5": "#9467bd", "single_stream": "#ff7f0e", "resnet18": "#2ca02c",
    "resnet18_170k": "#2ca02c", "resnet18_10m": "#98df8a", "resnet101": "#7f7f7f",
    "node": "#d62728", "anode": "#e377c2",
    "broyden": "#1f77b4", "fixed_point": "#e6ab02",
}
DASHED = ("cifar10_mdeq_large", "cifar10_resnet18_10m")  # Table 1's with-augmentation block
SCALE_COLORS = ("#c51b7d", "#4d9221", "#2166ac", "#b35806")


def set_style() -> None:
    """One matplotlib style for every figure of the repository (non-interactive, deterministic SVG)."""
    if not os.environ.get("MPLBACKEND"):
        try:  # IPython is there in a notebook (the notebooks extra), not necessarily elsewhere
            from IPython import get_ipython

            inline = get_ipython() is not None
        except ImportError:
            inline = False
        if not inline:
            matplotlib.use("Agg")
    matplotlib.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 200, "font.size": 9, "axes.titlesize": 10,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False, "legend.fontsize": 8, "lines.linewidth": 1.6,
        "svg.hashsalt": SVG_HASHSALT, "svg.fonttype": "path", "image.interpolation": "nearest",
    })


def figure_title(title: str, kind: str) -> str:
    return f"{title}\n({SMOKE_NOTE})" if kind == "smoke" else title


def no_data(ax, message: str) -> None:
    """An empty panel saying why there is nothing to draw (never a fabricated curve)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 30)), ha="center", va="center",
            transform=ax.transAxes, fontsize=9, color="#777777")


_CURVE_STYLE = {  # curve key -> (label, colour key, line style)
    "broyden_final": ("Broyden (final weights)", "broyden", "-"),
    "broyden_init": ("Broyden (initial weights)", "broyden", ":"),
    "fixed_point_final": ("iterating f (final weights)", "fixed_point", "-"),
    "fixed_point_init": ("iterating f (initial weights)", "fixed_point", ":"),
}
_DATASET_TITLES = {"cifar10": "CIFAR-10", "imagenet": "ImageNet", "cityscapes": "Cityscapes"}
_SOLVER_LABELS = {"broyden": "Broyden", "fixed_point": "iterating f"}


def _curve_label(key: str, curve: Mapping) -> str:
    """"Broyden, initial weights" / "iterating f, trained, epoch 4 of 50, step 1800" (older traces: by key)."""
    solver = "Broyden" if key.startswith("broyden") else "iterating f"
    weights = curve.get("weights")
    if not isinstance(weights, str) or "/" in weights or weights.startswith("initial ("):
        return _CURVE_STYLE.get(key, (key,))[0]
    return f"{solver}, {weights}"


BEST = "best epoch (reference only)"  # a page table's column beside ours: the best evaluated epoch's value
_NUMBERS = ("paper", "ours", "delta", BEST)  # the columns a page table reads across; the metric is named once above them
_PAGE_CSS = """<style>
table.mdeq-page {margin-left: 0; margin-right: auto; font-size: 0.9em;}
table.mdeq-page th, table.mdeq-page td {padding: 2px 8px; text-align: left; vertical-align: top;}
table.mdeq-page caption {caption-side: top; text-align: left; font-weight: bold;}
table.mdeq-page td.rowname {min-width: 11em;}  /* not .row: Bootstrap's grid class */
table.mdeq-page td.number {white-space: nowrap;}
table.mdeq-page td.cell {min-width: 7em;}
table.mdeq-page th.setting {font-style: italic; padding-top: 8px; border-bottom: 1px solid #bbb;}
table.mdeq-page th.metric {text-align: center; border-bottom: 1px solid #bbb;}
</style>"""


@dataclass(frozen=True, eq=False)
class PageTable:
    """A table as a page shows it: ``data`` holds the shown columns flat, and only the HTML groups them.

    A header row per setting and the metric named once above the paper/ours columns, as the paper's Table 1 does,
    so that those columns carry the eye; a metric that changes from row to row stays a column, and a row name
    repeated over its metrics (Table 2's top-1 and top-5) is written once."""

    data: pd.DataFrame
    caption: str

    def __repr__(self) -> str:
        return f"{self.caption}\n{self.data.to_string(index=False)}"

    def _repr_html_(self) -> str:
        d = self.data.fillna("").astype(str)
        rows = d.to_dict("records")
        metrics = list(dict.fromkeys(d["metric"])) if "metric" in d else []
        cols = [c for c in d.columns if c != "setting" and not (c == "metric" and len(metrics) == 1)]
        nums = [c for c in cols if c in _NUMBERS]
        esc = html.escape
        head = ""
        if len(metrics) == 1 and nums:
            head = "<tr>" + "".join(f'<th colspan="{len(nums)}" class="metric">{esc(metrics[0])}</th>' if c == nums[0]
                                    else "" if c in nums else "<th></th>" for c in cols) + "</tr>"
        head += "<tr>" + "".join(f'<th style="text-align: left">{"" if c == "row" else esc(c)}</th>'
                                 for c in cols) + "</tr>"
        span, skip, i = {}, set(), 0  # cells of one row name over its metrics, written once
        while i < len(rows):
            j = i + 1
            while j < len(rows) and all(rows[j][k] == rows[i][k] for k in ("setting", "row") if k in d):
                j += 1
            for c in cols:
                if c not in nums and c != "metric" and len({rows[k][c] for k in range(i, j)}) == 1 and j - i > 1:
                    span[i, c] = j - i
                    skip.update((k, c) for k in range(i + 1, j))
            i = j
        body, setting = [], ""
        for i, r in enumerate(rows):
            if r.get("setting", "") not in ("", setting):
                setting = r["setting"]
                body.append(f'<tr><th colspan="{len(cols)}" class="setting" style="text-align: left">'
                            f'{esc(setting)}</th></tr>')
            body.append("<tr>" + "".join(
                f'<td class="{"number" if c in nums else "rowname" if c == "row" else "cell"}" style="text-align: left'
                + ('; white-space: nowrap"' if c in nums else '"')
                + (f' rowspan="{span[i, c]}"' if (i, c) in span else "") + f">{esc(r[c])}</td>"
                for c in cols if (i, c) not in skip) + "</tr>")
        return (f'{_PAGE_CSS}<table class="mdeq-page"><caption style="text-align: left">{esc(self.caption)}</caption>'
                f'<thead>{head}</thead><tbody>{"".join(body)}</tbody></table>')
