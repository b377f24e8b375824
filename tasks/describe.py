"""A study's descriptive statistics ("Table 1"), per site and pooled, with small-cell suppression.

Each site computes its own summary from its mapped records: per numeric variable the count,
sum, sum of squares, minimum and maximum, and per categorical or binary variable the count of
each code, with missing counted apart. ``table_one`` combines the sites and releases:
- a count below the study's ``min_cell`` is suppressed (shown as "<k");
- a site's mean, SD, minimum and maximum are suppressed (shown as "withheld") when its count is;
- the suppression is made safe against subtraction. No released margin (a site's total over a
  variable's codes, or a code's pooled count over the sites) may have exactly one suppressed
  cell, or that cell would be the margin minus the others. The smallest other cell is
  suppressed too ("withheld": it need not be small, it is hidden so that the small one cannot
  be recovered), until none has.

The minimum and maximum are exact patient values: only a site with at least ``min_cell``
rows releases them, and the pooled ones are over those sites. The pooled counts, means and SDs
are exact: sums of the sites' sufficient statistics. ``TableOne.markdown()`` writes the table for
a paper, ``TableOne.csv()`` for a spreadsheet (full precision).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from nordfl.tasks.study import Study


class NumericSummary(NamedTuple):
    count: int
    total: float
    squares: float
    minimum: float
    maximum: float
    missing: int

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def sd(self) -> float:
        if self.count < 2:
            return math.nan
        return math.sqrt(max(self.squares - self.total**2 / self.count, 0.0) / (self.count - 1))


def summarise(study: Study, values: Mapping[str, np.ndarray]) -> dict:
    """One site's sufficient statistics: numeric -> NumericSummary, categorical -> {code: count, None: missing}."""
    summary = {}
    for variable in study.variables:
        column = np.asarray(values[variable.name])
        if variable.kind in ("categorical", "binary"):
            counts = {code: int(np.sum(column == i)) for i, code in enumerate(variable.codes)}
            counts[None] = int(np.sum(column < 0))
            summary[variable.name] = counts
        else:
            present = column[~np.isnan(column)]
            summary[variable.name] = NumericSummary(
                int(present.size), float(present.sum()), float(np.square(present).sum()),
                float(present.min()) if present.size else math.nan, float(present.max()) if present.size else math.nan,
                int(column.size - present.size))
    return summary


def _suppressed_cells(counts: np.ndarray, min_cell: int) -> np.ndarray:
    """Which cells of a [sites, codes] count table to withhold: those below ``min_cell``, and
    complements, until no site row and no code column has exactly one withheld cell."""
    hidden = (counts > 0) & (counts < min_cell)
    changed = True
    while changed:
        changed = False
        for axis in (1, 0):  # a site's codes (its total is released), then a code's sites (the pooled count is)
            lines = hidden if axis == 1 else hidden.T
            values = counts if axis == 1 else counts.T
            for i in range(lines.shape[0]):
                if lines[i].sum() == 1 and (~lines[i]).any():
                    others = np.where(lines[i], np.inf, values[i].astype(float))
                    j = int(np.argmin(others))
                    if axis == 1:
                        hidden[i, j] = True
                    else:
                        hidden[j, i] = True
                    changed = True
            if changed:
                break
    return hidden


class TableOne(NamedTuple):
    """Released figures: ``sites`` and ``pooled`` map variable -> {statistic or code: value, "<k" or "withheld"}."""

    sites: dict  # site -> variable -> {...}
    pooled: dict  # variable -> {...}
    min_cell: int

    def markdown(self) -> str:
        names = list(self.sites)
        lines = ["| variable | " + " | ".join(names) + " | pooled |", "|---|" + "---:|" * (len(names) + 1)]
        for variable, pooled in self.pooled.items():
            for key in pooled:
                label = f"{variable} {key}" if key is not None else f"{variable} missing"
                cells = [_shown(self.sites[s][variable][key]) for s in names] + [_shown(pooled[key])]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv(self) -> str:
        """The same table as CSV, one row per variable and statistic (or code), numbers at full precision:
        ``variable,statistic,<site>...,pooled``; a small count is ``<k``, another hidden cell ``withheld``, a figure that does not exist ``n/a``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        names = list(self.sites)
        writer.writerow(["variable", "statistic", *names, "pooled"])
        for variable, pooled in self.pooled.items():
            for key in pooled:
                cells = [self.sites[s][variable][key] for s in names] + [pooled[key]]
                writer.writerow([variable, "missing" if key is None else key, *(_exact(c) for c in cells)])
        return buffer.getvalue()


def _exact(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else repr(value)
    return str(value)


def _shown(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _cell(count, hidden: bool, k: int):
    """A released count: the number, "<k" for a small one, "withheld" for a complement hidden to protect one."""
    if not hidden:
        return int(count)
    return f"<{k}" if 0 < count < k else "withheld"


def table_one(study: Study, summaries: Mapping[str, dict]) -> TableOne:
    """The releasable Table 1 from the sites' summaries (``summarise``), suppressed as the module says."""
    names: Sequence[str] = list(summaries)
    k = study.min_cell
    small_text, withheld_text = f"<{k}", "withheld"
    sites = {s: {} for s in names}
    pooled = {}
    for variable in study.variables:
        if variable.kind in ("categorical", "binary"):
            keys = [*variable.codes, None]
            counts = np.array([[summaries[s][variable.name][c] for c in keys] for s in names], np.int64)
            hidden = _suppressed_cells(counts, k)
            for i, s in enumerate(names):
                sites[s][variable.name] = {c: _cell(counts[i, j], hidden[i, j], k) for j, c in enumerate(keys)}
            totals = counts.sum(axis=0)
            pooled[variable.name] = {c: small_text if 0 < totals[j] < k else int(totals[j]) for j, c in enumerate(keys)}
        else:
            parts = [summaries[s][variable.name] for s in names]
            # n and missing sum to the site's rows and, over the sites, to the pooled figures: suppress as a table.
            hidden = _suppressed_cells(np.array([[p.count, p.missing] for p in parts], np.int64), k)
            for i, (s, part) in enumerate(zip(names, parts)):
                withheld = hidden[i, 0] or part.count < k
                sites[s][variable.name] = {
                    "n": _cell(part.count, hidden[i, 0], k),
                    **{key: withheld_text if withheld else value for key, value in
                       (("mean", part.mean), ("sd", part.sd), ("min", part.minimum), ("max", part.maximum))},
                    "missing": _cell(part.missing, hidden[i, 1], k),
                }
            released = [p for i, p in enumerate(parts) if not hidden[i, 0] and p.count >= k]
            total = NumericSummary(sum(p.count for p in parts), sum(p.total for p in parts), sum(p.squares for p in parts),
                                   min((p.minimum for p in released), default=math.nan),
                                   max((p.maximum for p in released), default=math.nan), sum(p.missing for p in parts))
            small = total.count < k
            pooled[variable.name] = {"n": small_text if 0 < total.count < k else total.count,
                                     "mean": withheld_text if small else total.mean, "sd": withheld_text if small else total.sd,
                                     "min": withheld_text if small else total.minimum,
                                     "max": withheld_text if small else total.maximum,
                                     "missing": small_text if 0 < total.missing < k else total.missing}
    return TableOne(sites, pooled, k)


NUMERIC_FIELDS = ("count", "total", "squares", "minimum", "maximum", "missing")
"""A numeric variable's summary as the vector a site sends in the Table 1 job, in this order."""


def summary_arrays(study: Study, summary: Mapping[str, object], *, min_cell: int = 0) -> dict:
    """A site's summary as named float64 vectors (what travels): numeric ``NUMERIC_FIELDS``, categorical
    the count of each code then the missing count.

    With ``min_cell``, a site whose count of a variable is below it sends NaN for that variable's minimum
    and maximum: they are patient values that a small site must not give away (``table_one`` would not
    release them either)."""
    arrays = {}
    for v in study.variables:
        part = summary[v.name]
        if v.kind in ("categorical", "binary"):
            arrays[v.name] = np.asarray([part[c] for c in (*v.codes, None)], np.float64)
        else:
            hide = part.count < min_cell
            arrays[v.name] = np.asarray([part.count, part.total, part.squares, math.nan if hide else part.minimum,
                                         math.nan if hide else part.maximum, part.missing], np.float64)
    return arrays


def summary_template(study: Study) -> dict:
    """The shapes ``summary_arrays`` gives for this study (what a receiver checks a site's message against)."""
    return {v.name: np.zeros(len(v.codes) + 1 if v.kind in ("categorical", "binary") else len(NUMERIC_FIELDS), np.float64)
            for v in study.variables}


def summary_from_arrays(study: Study, arrays: Mapping[str, np.ndarray], source: str = "summary") -> dict:
    """The summary back from received vectors, checked: counts are non-negative whole numbers, sums finite."""
    summary = {}
    for v in study.variables:
        values = np.asarray(arrays[v.name], np.float64)
        counts = values if v.kind in ("categorical", "binary") else values[[0, 5]]
        if not (np.all(np.isfinite(counts)) and np.all(counts >= 0) and np.all(counts == np.round(counts))):
            raise ValueError(f"{source}: {v.name}: counts must be whole numbers >= 0, got {counts.tolist()}")
        if v.kind in ("categorical", "binary"):
            summary[v.name] = {c: int(n) for c, n in zip((*v.codes, None), values)}
        else:
            if not np.all(np.isfinite(values[1:3])):
                raise ValueError(f"{source}: {v.name}: sum and sum of squares must be finite, got {values[1:3].tolist()}")
            summary[v.name] = NumericSummary(int(values[0]), float(values[1]), float(values[2]), float(values[3]),
                                             float(values[4]), int(values[5]))
    return summary
