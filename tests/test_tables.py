"""Tables 2-4 from run folders (magr.reproduction.tables) and their Markdown / CSV output."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from magr.reproduction import tables
from magr.reproduction.cells import load_cells, ordering_table, rerun_interval
from magr.core.methods import QuantConfig
from magr.pipeline.persistence import write_run


# ------------------------------------------------------------------------------------- Tables 2-4
def _write_cell(root, name, method, bits, group, ppl, seconds=10.0, blocks=(4.0, 6.0), seed=0, **settings):
    cfg = QuantConfig.build(method=method, bits=bits, group_size=group, **settings)
    meta = {"model": "m", "device": "cpu", "config": cfg.to_dict(),
            "calibration": {"calib": "c4", "nsamples": 2, "seqlen": 8, "seed": seed, "sampler": "released"},
            "seconds": seconds,
            "block_seconds": list(blocks),
            "ppl": {"wikitext2": {"ppl": ppl, "seqlen": 8, "max_windows": 2}, "c4": {"ppl": 2 * ppl}}}
    records = [{"block": b, "layer": n, "seconds": 1.0, "seconds_magr": 0.5 if "magr" in method else 0.0,
                "seconds_quant": 0.25, "seconds_refine": 0.125 if cfg.refine else 0.0}
               for b in range(len(blocks)) for n in ("a", "b")]
    write_run(root / name, meta, records)


def test_perplexity_table_order_and_paper_columns(tmp_path):
    _write_cell(tmp_path, "g", "optq", 3, 64, 9.0)
    _write_cell(tmp_path, "a", "magr+optq", 3, None, 8.0)
    _write_cell(tmp_path, "b", "rtn", 4, None, 7.0)
    _write_cell(tmp_path, "c", "rtn", 3, None, 50.0)
    cells = load_cells(tmp_path)
    assert [c["name"] for c in cells] == ["a", "b", "c", "g"]
    table = tables.perplexity_table(cells, {"ppl": {"wikitext2": {"ppl": 6.0}, "c4": {"ppl": 12.0}}})
    assert list(zip(table["setting"], table["method"])) == [
        ("float", "float"), ("W4", "RTN"), ("W3", "RTN"), ("W3", "MagR+OPTQ"), ("W3g64", "OPTQ")]
    assert list(table["c4"]) == [12.0, 14.0, 100.0, 16.0, 18.0]
    paper = tables.with_paper(table)
    assert paper["paper LLaMA-2-7B WikiText-2"].tolist()[:4] == [5.47, 6.11, 539.48, 6.41]
    assert paper["paper LLaMA-2-70B WikiText-2"].tolist()[3] == 3.82
    assert math.isnan(paper["paper LLaMA-2-7B WikiText-2"].iloc[4])  # no per-group anchor in the notes


def test_cells_at_other_alphas_get_their_own_rows_and_stay_out_of_the_orderings(tmp_path):
    """A MagR cell away from the paper's alpha is its own row ("MagR+RTN alpha=0.01"), after the paper's, without
    the paper's column; the orderings and the reproduction check keep the paper-alpha cell apart from it."""
    from magr.reproduction.reported import report_values

    for seed in range(2):
        _write_cell(tmp_path / "cells" / "w3-magr-rtn", f"seed-{seed}", "magr+rtn", 3, None, 20.0 + seed, seed=seed)
        _write_cell(tmp_path / "cells" / "w3-magr-rtn-a1e-2", f"seed-{seed}", "magr+rtn", 3, None, 90.0 + seed,
                    seed=seed, alpha=0.01)
        _write_cell(tmp_path / "cells" / "w3-magr-rtn-a1e-4", f"seed-{seed}", "magr+rtn", 3, None, 30.0 + seed,
                    seed=seed, alpha=1e-4)
    _write_cell(tmp_path / "cells" / "w3-rtn", "seed-0", "rtn", 3, None, 50.0)
    cells = load_cells(tmp_path / "cells")
    table = tables.perplexity_table(cells)
    assert [tables.method_name(m, a, g) for m, a, g in zip(table["method"], table["alpha"], table["group"])] == [
        "RTN", "MagR+RTN alpha=0.0001", "MagR+RTN", "MagR+RTN alpha=0.01"]
    shown = tables.with_paper(tables.with_ranges(table, ["wikitext2", "c4"]))
    assert list(shown["alpha"]) == ["-", "0.0001", "0.001", "0.01"]
    assert shown["paper LLaMA-2-7B WikiText-2"].notna().tolist() == [True, False, True, False]
    orders = ordering_table(cells, [("MagR+RTN", "RTN")], ["W3"], ["wikitext2"], tables.cell_key)
    assert len(orders) == 1 and orders["mean log ratio"].iloc[0] == pytest.approx(
        (math.log(50 / 20) + math.log(50 / 21)) / 2)   # the paper-alpha cell, not the last one loaded
    tables.write_table(table, tmp_path / "reports" / "table2_perplexity")
    values = report_values(tmp_path / "reports")
    assert values["ppl W3 MagR+RTN wikitext2"]["value"] == pytest.approx(20.5)
    assert values["ppl W3 MagR+RTN alpha=0.01 wikitext2"]["value"] == pytest.approx(90.5)


def test_runtime_table_splits_the_time(tmp_path):
    _write_cell(tmp_path, "x", "magr+optq", 3, None, 8.0, seconds=12.0, blocks=(5.0, 7.0))
    _write_cell(tmp_path, "y", "rtn", 3, None, 9.0, seconds=3.0, blocks=(1.0, 2.0))
    table = tables.runtime_table(load_cells(tmp_path))
    assert list(table["method"]) == ["RTN", "MagR+OPTQ"]
    row = table.set_index("method").loc["MagR+OPTQ"]
    assert row["MagR (s)"] == pytest.approx(2.0) and row["quantizer (s)"] == pytest.approx(1.0)
    assert row["CD (s)"] == pytest.approx(0.5) and row["CD passes"] == 1
    assert row["forward + stats (s)"] == pytest.approx(8.5)
    assert row["per block (s, mean)"] == pytest.approx(6.0) and row["per block (s, max)"] == pytest.approx(7.0)
    assert row["paper LLaMA-2-7B A100 (min)"] == 35


def test_seeds_give_means_ranges_and_seed_by_seed_orderings(tmp_path):
    for seed, (optq, magr) in enumerate([(10.0, 8.0), (12.0, 13.0), (11.0, 9.0)]):
        _write_cell(tmp_path / "w3-optq", f"seed-{seed}", "optq", 3, None, optq, seed=seed)
        _write_cell(tmp_path / "w3-magr-optq", f"seed-{seed}", "magr+optq", 3, None, magr, seed=seed)
    _write_cell(tmp_path / "w3-rtn", "seed-0", "rtn", 3, None, 50.0)  # calibration-free: one run
    cells = load_cells(tmp_path)
    table = tables.perplexity_table(cells).set_index("method")
    assert table.loc["OPTQ", "wikitext2"] == pytest.approx(11.0)
    assert (table.loc["OPTQ", "wikitext2 min"], table.loc["OPTQ", "wikitext2 max"]) == (10.0, 12.0)
    assert table.loc["OPTQ", "seeds"] == 3 and table.loc["RTN", "seeds"] == 0
    shown = tables.with_ranges(tables.perplexity_table(cells), ["wikitext2"]).set_index("method")
    assert shown.loc["OPTQ", "wikitext2"] == "11.00 [10.00, 12.00]" and shown.loc["RTN", "wikitext2"] == "50.00"
    assert shown.loc["RTN", "seeds"] == "calibration-free" and shown.loc["RTN", "wikitext2 rerun"] == "-"
    low, high = rerun_interval([10.0, 12.0, 11.0])
    assert shown.loc["OPTQ", "wikitext2 rerun"] == f"{low:.2f}-{high:.2f}" and low < 10.0 and high > 12.0
    pairs = [("MagR+OPTQ", "OPTQ"), ("OPTQ", "RTN"), ("MagR+OPTQ", "RTN")]
    orders = ordering_table(cells, pairs, ["W3"], ["wikitext2", "c4"], tables.cell_key)
    rows = orders[orders["set"] == "wikitext2"].set_index("ordering")
    assert rows.loc["MagR+OPTQ < OPTQ", "seeds where it holds"] == "2 of 3"  # seed 1: 13 > 12
    assert not rows.loc["MagR+OPTQ < OPTQ", "stated"]
    assert rows.loc["MagR+OPTQ < OPTQ", "why not stated"].startswith("holds in 2 of 3 seeds only")
    assert rows.loc["OPTQ < RTN", "holds in every seed"] and rows.loc["OPTQ < RTN", "stated"]  # 10-12 vs 50
    assert rows.loc["OPTQ < RTN", "why not stated"] == ""


def test_why_an_ordering_is_not_stated_names_its_numbers():
    from magr.reproduction.cells import ordering

    reversed_ = ordering([(130.0, 120.0), (100.0, 90.0), (140.0, 130.0)])
    assert reversed_["why not stated"] == "reversed on average: the second is 8.3 % lower (holds in 0 of 3 seeds)"
    close = ordering([(100.0, 101.0), (100.0, 102.0), (100.0, 101.5)])
    assert close["holds in every seed"] and not close["stated"]
    assert close["why not stated"].startswith("holds in every seed (on average the second is 1.5 % higher), but")


def test_rerun_interval_is_the_t_prediction_interval_on_the_log_scale():
    """n = 3 values: exp(mean log +- t(0.975, 2) s sqrt(2/3)), t = 4.303; one value: no width; wider with spread."""
    import math
    import statistics

    logs = [math.log(v) for v in (100.0, 120.0, 90.0)]
    half = 4.303 * statistics.stdev(logs) * math.sqrt(2 / 3)
    low, high = rerun_interval([100.0, 120.0, 90.0])
    assert (math.log(low), math.log(high)) == pytest.approx((statistics.fmean(logs) - half, statistics.fmean(logs) + half))
    assert rerun_interval([5.0]) == pytest.approx((5.0, 5.0))
    assert rerun_interval([100.0, 101.0, 99.0])[1] < high


def test_zeroshot_standard_errors_and_differences():
    res = {"float": {"piqa": {"acc": 0.70, "acc_stderr": 0.02, "n": 500}},
           "W3 RTN": {"piqa": {"acc": 0.60, "acc_stderr": 0.02, "n": 500}},
           "W3 MagR+OPTQ": {"piqa": {"acc": 0.62, "acc_stderr": 0.02, "n": 500}}}
    table = tables.zeroshot_table(res)
    assert table.set_index("model").loc["W3 RTN", "piqa se"] == pytest.approx(2.0)
    assert tables.with_errors(table, ["piqa"]).set_index("model").loc["float", "piqa"] == "70.0 ± 2.0"
    big = tables.zeroshot_differences(res, "float", "W3 RTN").iloc[0]
    small = tables.zeroshot_differences(res, "W3 MagR+OPTQ", "W3 RTN").iloc[0]
    assert big["difference (points)"] == pytest.approx(10.0) and big["larger than 2 se"]
    assert small["se of the difference"] == pytest.approx(2.0 * 2 ** 0.5) and not small["larger than 2 se"]


def test_load_cell_missing_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_cells(tmp_path, ["nothing"])


def test_labels_and_descriptions_come_from_the_presets():
    cfg = QuantConfig.build(method="magr+optq-cd", bits=2, iters=14).to_dict()
    assert tables.cell_label(cfg) == "W2 MagR+OPTQ†"
    text = tables.describe_config(cfg)
    assert "14 FISTA iterations" in text and "30 CD passes" in text and "beta 0.8" in text
    assert tables.cell_label(QuantConfig.build(method="optq", bits=3, group_size=64).to_dict()) == "W3g64 OPTQ"
    assert tables.cell_label(QuantConfig.build(method="magr+rtn", bits=3, group_size=64).to_dict()) == "W3g64 MagR+RTN"
    assert tables.cell_label(QuantConfig.build(method="magr+rtn", bits=3, alpha=0.01).to_dict()) == "W3 MagR+RTN alpha=0.01"


def test_zeroshot_table_and_markdown():
    res = {"float": {"piqa": {"acc": 0.6, "n": 10}, "arc_easy": {"acc": 0.4, "n": 10}},
           "W3 RTN": {"piqa": {"acc": 0.5, "n": 10}, "arc_easy": {"acc": 0.3, "n": 10}}}
    table = tables.zeroshot_table(res)
    assert table["mean"].tolist() == pytest.approx([50.0, 40.0])
    assert table["items per task"].tolist() == [10, 10]
    md = tables.markdown_table(pd.DataFrame({"max|w|": [1.23456, math.nan], "name": ["a", "b"]}))
    lines = md.splitlines()
    assert lines[0] == "| max\\|w\\| | name |"
    assert lines[2] == "| 1.23 | a |" and lines[3] == "| - | b |"
    # a non-zero value the format would round to zero (Table 4's alpha column at ".1f") keeps its digits
    small = tables.markdown_table(pd.DataFrame({"alpha": [0.001, 0.0, 2.25]}), ".1f").splitlines()[2:]
    assert small == ["| 0.001 |", "| 0.0 |", "| 2.2 |"]


def test_write_table(tmp_path):
    csv, md = tables.write_table(pd.DataFrame({"a": [1.0]}), tmp_path / "sub" / "t", title="T", notes="n")
    assert csv.read_text().splitlines() == ["a", "1.0"]
    assert md.read_text() == "## T\n\n| a |\n|---:|\n| 1.00 |\n\nn\n"


def test_reproduction_check_reads_the_rerun_interval_and_flags_a_value_outside(tmp_path):
    """report_values takes a seed-averaged perplexity's stated uncertainty from its rerun interval; compare says
    "within" for a fresh mean inside it and "OUTSIDE" for one beyond, and RTN gets the exact rule."""
    from magr.reproduction.reported import compare, report_values

    for seed, ppl in enumerate([10.0, 12.0, 11.0]):
        _write_cell(tmp_path / "cells" / "w3-optq", f"seed-{seed}", "optq", 3, None, ppl, seed=seed)
    _write_cell(tmp_path / "cells" / "w3-rtn", "seed-0", "rtn", 3, None, 50.0)
    table = tables.perplexity_table(load_cells(tmp_path / "cells"))
    tables.write_table(table, tmp_path / "reports" / "table2_perplexity")
    committed = report_values(tmp_path / "reports")
    optq, rtn = committed["ppl W3 OPTQ wikitext2"], committed["ppl W3 RTN wikitext2"]
    assert optq["rule"] == "rerun interval" and (optq["low"], optq["high"]) == pytest.approx(rerun_interval([10, 12, 11]))
    assert rtn["rule"] == "float-sum order" and rtn["high"] == pytest.approx(50.5)
    fresh = {**committed, "ppl W3 OPTQ wikitext2": {**optq, "value": optq["high"] * 1.01}}
    verdicts = compare(committed, fresh).set_index("value")["verdict"]
    assert verdicts["ppl W3 OPTQ wikitext2"] == "OUTSIDE" and verdicts["ppl W3 RTN wikitext2"] == "within"
    in_range = compare(committed, fresh).set_index("value")["in seed range"]
    assert in_range["ppl W3 OPTQ wikitext2"] is False and in_range["ppl W3 RTN wikitext2"] is None


def test_zero_shot_rule_depends_on_whether_the_model_reads_calibration_data(tmp_path):
    """A zero-shot accuracy of a seed-averaged (calibration) model gets the interval of a second draw on the same
    items, the float / RTN model one standard error; 0 % still has an interval."""
    from magr.reproduction.reported import compare, report_values, rerun_accuracy

    for seed, ppl in enumerate([10.0, 12.0, 11.0]):
        _write_cell(tmp_path / "cells" / "w3-optq", f"seed-{seed}", "optq", 3, None, ppl, seed=seed)
    _write_cell(tmp_path / "cells" / "w3-rtn", "seed-0", "rtn", 3, None, 50.0)
    tables.write_table(tables.perplexity_table(load_cells(tmp_path / "cells")), tmp_path / "reports" / "table2_perplexity")
    res = {label: {"piqa": {"acc": 0.1, "acc_stderr": 0.0688, "n": 20}} for label in ("W3 RTN", "W3 OPTQ")}
    tables.write_table(tables.zeroshot_table(res), tmp_path / "reports" / "table3_zeroshot")
    committed = report_values(tmp_path / "reports")
    rtn, optq = committed["zero-shot W3 RTN piqa"], committed["zero-shot W3 OPTQ piqa"]
    assert rtn["rule"] == "standard error" and rtn["high"] == pytest.approx(16.88)
    assert optq["rule"] == "rerun interval (items)" and (optq["low"], optq["high"]) == pytest.approx(rerun_accuracy(10, 20))
    assert optq["low"] == 0 and 30 < optq["high"] < 35        # 10 % of 20: [0, 33.1]
    fresh = {**committed, "zero-shot W3 RTN piqa": {**rtn, "value": 25.0}, "zero-shot W3 OPTQ piqa": {**optq, "value": 25.0}}
    verdicts = compare(committed, fresh).set_index("value")["verdict"]
    assert verdicts["zero-shot W3 RTN piqa"] == "OUTSIDE" and verdicts["zero-shot W3 OPTQ piqa"] == "within"
    assert rerun_accuracy(0, 20)[1] > 0 and rerun_accuracy(100, 20)[0] < 100
    assert rerun_accuracy(50, 2000)[1] - 50 == pytest.approx(1.96 * 100 * (2 * 0.25 / 2000) ** 0.5, rel=1e-3)


def test_reproduction_check_reads_the_alpha_ablation(tmp_path):
    """alpha/<model>/alpha_optimum.csv: the ratio at the paper's alpha with its interval over layers (a NaN ratio
    is not a value); alpha_perplexity/<model>/alpha_perplexity.csv: Table 2's rules, the alpha in the name."""
    from magr.reproduction.reported import compare, report_values

    (tmp_path / "alpha" / "m1").mkdir(parents=True)
    pd.DataFrame([{"grid": "per channel", "quantizer": "RTN", "bits": 3, "ratio at paper": 0.8, "paper 95% low": 0.7,
                   "paper 95% high": 0.9},
                  {"grid": "g4", "quantizer": "OPTQ", "bits": 2, "ratio at paper": float("nan"),
                   "paper 95% low": float("nan"), "paper 95% high": float("nan")}]
                 ).to_csv(tmp_path / "alpha" / "m1" / "alpha_optimum.csv", index=False)
    (tmp_path / "alpha_perplexity" / "m1").mkdir(parents=True)
    pd.DataFrame([{"set": "c4", "bits": 3, "method": "RTN", "alpha": None, "ppl": 50.0, "min": 50.0, "max": 50.0,
                   "rerun low": 50.0, "rerun high": 50.0, "seeds": 0},
                  {"set": "c4", "bits": 3, "method": "MagR+RTN", "alpha": 0.001, "ppl": 20.0, "min": 19.0,
                   "max": 21.0, "rerun low": 17.0, "rerun high": 23.0, "seeds": 3}]
                 ).to_csv(tmp_path / "alpha_perplexity" / "m1" / "alpha_perplexity.csv", index=False)
    values = report_values(tmp_path)
    assert set(values) == {"alpha ratio m1 per channel RTN W3 at paper alpha", "alpha ppl m1 c4 W3 RTN",
                           "alpha ppl m1 c4 W3 MagR+RTN alpha=0.001"}
    ratio = values["alpha ratio m1 per channel RTN W3 at paper alpha"]
    assert (ratio["low"], ratio["high"], ratio["rule"]) == (0.7, 0.9, "interval over layers")
    assert values["alpha ppl m1 c4 W3 RTN"]["rule"] == "float-sum order"
    assert values["alpha ppl m1 c4 W3 MagR+RTN alpha=0.001"]["rule"] == "rerun interval"
    fresh = {**values, "alpha ratio m1 per channel RTN W3 at paper alpha": {**ratio, "value": 0.95}}
    assert compare(values, fresh).set_index("value")["verdict"]["alpha ratio m1 per channel RTN W3 at paper alpha"] \
        == "OUTSIDE"
