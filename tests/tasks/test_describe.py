"""Table 1: the released figures equal a pooled NumPy computation, and no suppressed cell can be
recovered from what is released."""

import numpy as np
import pytest

from nordfl.tasks.describe import summarise, table_one
from nordfl.tasks.study import parse_study

STUDY = parse_study({
    "name": "t1", "task": "binary", "outcome": "event", "min_cell": 5,
    "variables": [
        {"name": "age", "kind": "numeric", "range": [0, 120]},
        {"name": "sex", "kind": "categorical", "codes": ["female", "male", "other"]},
        {"name": "event", "kind": "binary"},
    ],
})


def _site(rng, n, male_share, missing_age=0, other=0):
    age = rng.normal(60, 10, n)
    age[:missing_age] = np.nan
    sex = (rng.random(n) < male_share).astype(np.int32)
    sex[:other] = 2
    return {"age": age, "sex": sex, "event": (rng.random(n) < 0.3).astype(np.int32)}


@pytest.fixture
def sites():
    rng = np.random.default_rng(0)
    return {"Oslo": _site(rng, 80, 0.5, missing_age=7), "Tartu": _site(rng, 40, 0.5, other=3),
            "Turku": _site(rng, 60, 0.4, missing_age=2, other=6)}


def test_released_numbers_equal_a_pooled_numpy_computation(sites):
    table = table_one(STUDY, {s: summarise(STUDY, v) for s, v in sites.items()})
    ages = np.concatenate([v["age"] for v in sites.values()])
    present = ages[~np.isnan(ages)]
    pooled = table.pooled["age"]
    assert pooled["n"] == present.size and pooled["missing"] == 9
    assert pooled["mean"] == pytest.approx(present.mean(), rel=1e-12)
    assert pooled["sd"] == pytest.approx(present.std(ddof=1), rel=1e-9)
    oslo = sites["Oslo"]["age"][~np.isnan(sites["Oslo"]["age"])]
    assert table.sites["Oslo"]["age"]["sd"] == pytest.approx(oslo.std(ddof=1), rel=1e-9)
    assert table.sites["Oslo"]["age"]["max"] == oslo.max()
    sex = np.concatenate([v["sex"] for v in sites.values()])
    assert table.pooled["sex"] == {"female": int(np.sum(sex == 0)), "male": int(np.sum(sex == 1)), "other": 9, None: 0}
    assert "| sex other | withheld | <5 | 6 | 9 |" in table.markdown()  # Oslo's 0: the complement of Tartu's 3


def test_a_small_cell_is_neither_released_nor_recoverable_by_subtraction(sites):
    table = table_one(STUDY, {s: summarise(STUDY, v) for s, v in sites.items()})
    # Tartu's 3 "other" is below min_cell 5: withheld. Alone, it would be the pooled 9 minus Turku's 6,
    # and Tartu's 40 rows minus its female and male counts. Both margins must hide a second cell.
    assert table.sites["Tartu"]["sex"]["other"] == "<5"
    for variable in ("sex", "age"):
        keys = list(table.pooled[variable]) if variable == "sex" else ["n", "missing"]
        cells = [[table.sites[s][variable][key] for key in keys] for s in sites]
        for row in cells:  # a site's margin: its rows, known from any variable's counts
            assert sum(isinstance(c, str) for c in row) != 1, (variable, row)
        for j, key in enumerate(keys):  # a code's margin: the pooled count
            column = [row[j] for row in cells]
            if not isinstance(table.pooled[variable][key], str):
                assert sum(isinstance(c, str) for c in column) != 1, (variable, key, column)
    # Oslo's 7 missing ages are released; Turku's 2 are not, nor (its complement) another cell of that table.
    assert table.sites["Oslo"]["age"]["missing"] == 7 and table.sites["Turku"]["age"]["missing"] == "<5"
