"""The README's main job: a short run learns, on every algorithm family."""

import pytest

from nordfl.sim import quickstart


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "fedadam"])
def test_short_run_lowers_pooled_test_loss(algorithm, capsys):
    args = quickstart._parse(["--rounds", "5", "--algorithm", algorithm])
    result = quickstart.run(args)
    assert float(result.final.loss) < float(result.initial.loss)
    assert [s.name for s in result.sites] == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    assert "round   5/5" in capsys.readouterr().out


def test_main_prints_the_per_site_table(capsys):
    assert quickstart.main(["--rounds", "2"]) == 0
    out = capsys.readouterr().out
    for site in ("Cleveland", "Hungary", "Switzerland", "VA Long Beach", "pooled"):
        assert site in out


def test_bad_rounds_is_named(capsys):
    with pytest.raises(SystemExit):
        quickstart.main(["--rounds", "0"])
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err
