"""The per-sample results table: aggregates, JSONL files (torn lines, resume), merge, display."""

import io
import json
import warnings

import pytest

from relucap_plugin.results import ROW_FIELDS, Results, ResultsFileWarning, open_results_file

TM = {
    "norm": "Linf",
    "eps": [0.1, 0.3],
    "bounds": [0.0, 1.0],
    "steps": 40,
    "step_size": None,
    "restarts": 1,
    "random_start": True,
    "targeted": False,
    "loss": "ce",
}
META = {
    "model": "toy",
    "threat_model": TM,
    "config": {"seed": 0, "batch_size": 2, "n_samples": 4},
    "attacks": ["a:X", "b:X"],
    "n_samples": 4,
}


def row(sample, attack, eps, robust, clean=True, status="ok", family="X", **kw):
    return {
        "sample": sample,
        "attack": attack,
        "library": attack.split(":")[0],
        "family": family,
        "eps": eps,
        "label": 1,
        "clean_pred": 1 if clean else 0,
        "adv_pred": 1 if robust else 2,
        "clean_correct": clean,
        "adv_correct": robust,
        "norm": eps if clean else 0.0,
        "status": status,
        "reason": kw.pop("reason", None),
        "skipped": not clean,
        "time": 0.01,
        **kw,
    }


def table(a_robust, b_robust, eps=0.3):
    """Two attacks over samples 0..n-1 with the given per-sample verdicts."""
    rows = [row(i, "a:X", eps, r) for i, r in enumerate(a_robust)]
    rows += [row(i, "b:X", eps, r) for i, r in enumerate(b_robust)]
    return Results(rows, META)


def test_worst_case_is_mean_of_per_sample_minimum_not_minimum_of_means():
    # a fools samples 0 and 1, b fools samples 2 and 3: each alone 50%, together nothing holds.
    res = table([False, False, True, True], [True, True, False, False])
    assert res.robust_accuracy("a:X", 0.3) == 0.5
    assert res.robust_accuracy("b:X", 0.3) == 0.5
    assert res.worst_case(0.3) == 0.0
    assert res.per_sample_worst_case(0.3) == {0: False, 1: False, 2: False, 3: False}
    assert res.worst_case(0.3, attacks=["a:X"]) == 0.5
    worst_rows = [s for s in res.summary() if s["attack"].startswith("worst case")]
    assert [s["robust_accuracy"] for s in worst_rows] == [0.0]


def test_violation_never_counts_as_robust_and_is_reported():
    rows = [
        row(0, "a:X", 0.3, True),
        row(1, "a:X", 0.3, True, status="violation", reason="Linf norm 0.5 > eps 0.3"),
    ]
    res = Results(rows, META)
    assert res.rows[1]["adv_correct"] is False
    assert res.robust_accuracy("a:X", 0.3) == 0.5
    assert [r["sample"] for r in res.violations()] == [1]
    assert res.summary()[0]["violations"] == 1
    assert "failed verification" in res.table() and "norm 0.5 > eps 0.3" in res.table()


def test_failed_rows_have_no_outcome_are_listed_missing_and_a_retry_replaces_them():
    rows = [
        row(0, "a:X", 0.3, True),
        row(1, "a:X", 0.3, None, status="failed", reason="RuntimeError: boom"),
    ]
    res = Results(
        rows, {**META, "attacks": ["a:X"], "n_samples": 3, "threat_model": {**TM, "eps": [0.3]}}
    )
    assert res.rows[1]["adv_correct"] is None
    assert res.robust_accuracy("a:X", 0.3) is None  # incomplete: a figure over row 0 alone is biased
    assert res.summary()[0]["failed"] == 1 and res.summary()[0]["n"] == 1
    assert res.missing() == [(1, "a:X", 0.3), (2, "a:X", 0.3)]
    assert res.extend([row(1, "a:X", 0.3, False)]) == 1  # a completed row replaces the failure
    assert res.extend([row(1, "a:X", 0.3, None, status="failed")]) == 0  # but not the reverse
    assert res.robust_accuracy("a:X", 0.3) == 0.5
    assert res.missing() == [(2, "a:X", 0.3)]


def test_clean_accuracy_counts_samples_once_and_bad_rows_are_rejected():
    res = Results(
        [
            row(0, "a:X", 0.1, False),
            row(0, "a:X", 0.3, False),
            row(1, "a:X", 0.1, False, clean=False),
        ],
        META,
    )
    assert res.clean_accuracy() == 0.5
    assert res.samples == [0, 1] and res.eps == [0.1, 0.3]
    with pytest.raises(ValueError, match="status must be one of"):
        Results([row(0, "a:X", 0.3, True, status="great")])
    with pytest.raises(ValueError, match="lacks field"):
        Results([{"sample": 0, "attack": "a:X"}])


def test_agreement_puts_libraries_side_by_side_with_per_sample_disagreements():
    res = table([True, True, False, True], [True, False, False, True])
    res.extend([row(i, "c:Y", 0.3, True, family="Y") for i in range(4)])  # one library: no entry
    (entry,) = res.agreement()
    assert entry["family"] == "X" and entry["eps"] == 0.3
    assert entry["accuracy"] == {"a": 0.75, "b": 0.5}
    assert entry["disagreements"] == 1 and entry["n_common"] == 4
    assert entry["max_gap"] == pytest.approx(25.0)
    text = res.table()
    assert "Agreement across libraries" in text and "1/4" in text and "25.0" in text


def test_save_load_round_trip_keeps_rows_and_metadata(tmp_path):
    res = table([True, False, True, False], [False, False, True, True])
    res.extend([row(0, "a:X", 0.1, True, norm=float("nan"))])  # non-finite norm is stored as None
    path = tmp_path / "r.jsonl"
    res.save(path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["metadata"] == META and len(lines) == 1 + len(res)
    back = Results.load(path)
    assert back.metadata == META
    assert back.outcomes() == res.outcomes()
    assert back.rows[-1]["norm"] is None


def test_torn_last_line_is_dropped_with_a_warning_and_complete_rows_kept(tmp_path):
    res = table([True, False, True, False], [False, False, True, True])
    path = tmp_path / "r.jsonl"
    res.save(path)
    with open(path, "a") as f:
        f.write(json.dumps(row(9, "a:X", 0.3, True))[:40])  # killed mid-write
    with pytest.warns(ResultsFileWarning, match="torn last line"):
        back = Results.load(path)
    assert back.outcomes() == res.outcomes()


def test_damaged_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    table([True, True], [False, False]).save(path)
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3 is damaged"):
        Results.load(path)
    path.write_text('{"some": "json"}\n')
    with pytest.raises(ValueError, match="not a relucap results file"):
        Results.load(path)
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        Results.load(path)


@pytest.mark.parametrize("edit, field", [
    ({"adv_correct": "false"}, "adv_correct must be true or false"),  # bool("false") is True
    ({"clean_correct": "true"}, "clean_correct must be true or false"),
    ({"sample": 0.7}, "sample must be an integer"),  # int(0.7) is sample 0
    ({"label": "1"}, "label must be a number"),
    ({"adv_correct": True}, "adv_correct is True but adv_pred 2 and label 1"),
    ({"clean_pred": 0}, "clean_correct is True but clean_pred 0 and label 1"),
    ({"adv_correct": True, "adv_pred": 1, "clean_correct": False, "clean_pred": 0},
     "adv_correct is true but clean_correct is False"),
])
def test_a_hand_edited_row_that_would_be_read_as_another_outcome_is_refused(tmp_path, edit, field):
    """Before: "false" loaded as robust and a row whose adv_correct contradicts its prediction
    counted as robust, so the robust accuracy of an edited file was wrong without a word."""
    path = tmp_path / "r.jsonl"
    table([False, False], [False, False]).save(path)
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), **edit})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"line 2 is damaged .*{field}.*edited"):
        Results.load(path)
    with pytest.raises(ValueError, match=field):
        Results([{**row(0, "a:X", 0.3, False), **edit}])


def test_merge_is_idempotent_and_order_free():
    a = Results([row(i, "a:X", 0.3, i % 2 == 0) for i in range(4)], META)
    b = Results([row(i, "b:X", 0.3, i < 2) for i in range(2, 6)], META)
    ab = a.merge(b)
    assert len(ab) == 8
    assert ab.merge(a).outcomes() == ab.outcomes()
    assert ab.merge(ab, b).outcomes() == ab.outcomes()
    assert b.merge(a).outcomes() == ab.outcomes()
    assert a.merge(a).outcomes() == a.outcomes()
    with pytest.raises(ValueError, match="different evaluations.*steps"):
        a.merge(Results([], {**META, "threat_model": {**TM, "steps": 10}}))
    with pytest.raises(TypeError, match="only merge Results"):
        a.merge([])


def test_merge_unites_attacks_and_eps_in_metadata():
    a = Results(
        [row(0, "a:X", 0.1, True)],
        {**META, "attacks": ["a:X"], "threat_model": {**TM, "eps": [0.1]}},
    )
    b = Results(
        [row(0, "b:X", 0.3, True)],
        {**META, "attacks": ["b:X"], "threat_model": {**TM, "eps": [0.3]}},
    )
    m = a.merge(b)
    assert m.metadata["attacks"] == ["a:X", "b:X"]
    assert m.metadata["threat_model"]["eps"] == [0.1, 0.3]


def test_pandas_table_print_and_plot(tmp_path):
    res = table([True, False, True, False], [False, False, True, True])
    df = res.to_pandas()
    assert list(df.columns) == list(ROW_FIELDS) and len(df) == 8
    assert df.groupby("attack")["adv_correct"].mean().to_dict() == {"a:X": 0.5, "b:X": 0.5}
    md = res.table(markdown=True)
    assert "| a:X | 0.3 | 50.0% | 4 |" in md and "| worst case (2 attacks) | 0.3 | 25.0% |" in md
    buf = io.StringIO()
    res.print(file=buf)
    assert "50.0%" in buf.getvalue() and "worst case" in buf.getvalue()
    fig = res.plot(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels[:3] == ["a:X", "b:X", "worst case"]
    assert list(fig.axes[0].get_lines()[2].get_ydata()) == [25.0]


def test_open_results_file_resumes_repairs_and_refuses_other_evaluations(tmp_path):
    path = tmp_path / "r.jsonl"
    existing, writer = open_results_file(path, META, resume=True)
    assert len(existing) == 0
    with writer:
        writer.write([row(0, "a:X", 0.3, True), row(1, "a:X", 0.3, False)])
    with open(path, "a") as f:
        f.write('{"sample": 2, "att')  # torn
    with pytest.warns(ResultsFileWarning):
        existing, writer = open_results_file(path, {**META, "attacks": ["a:X", "c:Z"]}, resume=True)
    with writer:
        writer.write([row(2, "a:X", 0.3, True)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torn tail was cut before appending
        back = Results.load(path)
    assert [r["sample"] for r in back.rows] == [0, 1, 2]
    assert back.metadata["attacks"] == ["a:X", "b:X", "c:Z"]
    with pytest.raises(ValueError, match="different evaluation.*seed"):
        open_results_file(path, {**META, "config": {**META["config"], "seed": 1}}, resume=True)
    fresh, writer = open_results_file(path, META, resume=False)
    writer.close()
    assert len(fresh) == 0 and len(Results.load(path)) == 0


def test_add_returns_what_changed_under_the_failed_row_rule():
    """``Results.add`` is the one public way to add rows: a completed row replaces a failed one,
    nothing else replaces a row, and what changed comes back (to append to a file)."""
    res = Results([row(0, "a:X", 0.1, None, status="failed"), row(1, "a:X", 0.1, True)], META)
    changed = res.add([row(0, "a:X", 0.1, False), row(1, "a:X", 0.1, False),
                       row(2, "a:X", 0.1, True)])
    assert [(r["sample"], r["adv_correct"]) for r in changed] == [(0, False), (2, True)]
    assert res.get((1, "a:X", 0.1))["adv_correct"] is True  # a completed row is kept
    assert res.get((0, "a:X", 0.1))["status"] == "ok" and res.get((3, "a:X", 0.1)) is None
    assert res.add([row(0, "a:X", 0.1, None, status="failed")]) == []  # a failure never replaces
    changed[0]["adv_correct"] = True
    res.get((0, "a:X", 0.1))["adv_correct"] = True
    assert res.robust_accuracy("a:X", 0.1) == pytest.approx(2 / 3)  # copies: the table is intact
