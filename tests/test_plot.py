"""`python -m dualrl.plot`: seeds grouped into arms, mean ± spread of the last evaluation, a figure, loud errors."""

from __future__ import annotations

import json
import math

import pytest

from dualrl.plot import arm_name, main


def _run(path, evals: dict[int, float], extra_line: str | None = None):
    path.mkdir(parents=True)
    lines = [json.dumps({"step": 5, "train/loss": 1.0})]
    for step, value in evals.items():
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "eval/cycle_miou": value,
                    "eval/ref_miou": value / 2,
                    "eval/meteor": float("nan") if step == 0 else 0.8,
                }
            ).replace("NaN", "null")
        )
    if extra_line is not None:
        lines.append(extra_line)
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_seeds_form_one_arm_and_the_table_reports_mean_and_std(tmp_path, capsys):
    a = [_run(tmp_path / f"dual_seed{s}", {0: 0.4, 100: 0.5 + 0.1 * s}) for s in range(3)]
    b = [_run(tmp_path / f"control_s{s}", {0: 0.4, 100: 0.45}) for s in range(2)]
    out, table = tmp_path / "fig.png", tmp_path / "table.json"
    assert (
        main(
            [
                *map(str, a + b),
                "--out",
                str(out),
                "--json",
                str(table),
                "--metrics",
                "eval/cycle_miou",
                "eval/ref_miou",
                "eval/meteor",
            ]
        )
        == 0
    )
    assert out.stat().st_size > 1000
    rows = json.loads(table.read_text())
    assert list(rows) == ["dual", "control"] and rows["dual"]["seeds"] == 3
    cycle = rows["dual"]["metrics"]["eval/cycle_miou"]
    assert cycle["steps"] == [100] * 3 and math.isclose(cycle["mean"], 0.6) and math.isclose(cycle["std"], 0.1)
    assert rows["control"]["metrics"]["eval/ref_miou"]["mean"] == pytest.approx(0.225)
    # a null (non-finite) value is not a measurement: left out, with a warning naming it
    assert rows["dual"]["metrics"]["eval/meteor"]["values"] == [0.8] * 3
    captured = capsys.readouterr()
    assert "0.6000 ± 0.1000 @100" in captured.out
    assert "non-finite eval/meteor left out" in captured.err


def test_runs_of_one_arm_that_end_at_different_steps_report_their_last_evaluations(tmp_path, capsys):
    """Arms matched on wall time end at different steps: each run's own last evaluation counts."""
    runs = [
        _run(tmp_path / "more_seed0", {0: 0.4, 100: 0.5, 130: 0.7}),
        _run(tmp_path / "more_seed1", {0: 0.4, 100: 0.5}),
    ]
    table = tmp_path / "t.json"
    assert main([*map(str, runs), "--out", str(tmp_path / "f.png"), "--json", str(table)]) == 0
    cycle = json.loads(table.read_text())["more"]["metrics"]["eval/cycle_miou"]
    assert cycle["steps"] == [130, 100] and cycle["values"] == [0.7, 0.5]
    assert "0.6000 ± 0.1414 @100-130" in capsys.readouterr().out


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    run = _run(tmp_path / "r", {0: 0.3, 100: 0.35}, extra_line='{"step": 200, "eval/cycle')
    assert main([str(run), "--out", str(tmp_path / "f.png")]) == 0
    assert "torn last line" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "no_evals", "corrupt_middle", "bad_arm", "disjoint"])
def test_bad_inputs_are_one_error_line_and_exit_2(tmp_path, capsys, case):
    args = {
        "missing": [str(tmp_path / "nope")],
        "bad_arm": ["--arm", "x"],
    }.get(case)
    if case == "no_evals":
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
        args = [str(tmp_path / "r")]
    elif case == "corrupt_middle":
        run = _run(tmp_path / "r", {0: 0.3})
        (run / "metrics.jsonl").write_text("garbage\n" + (run / "metrics.jsonl").read_text())
        args = [str(run)]
    elif case == "disjoint":
        args = [str(_run(tmp_path / "a_seed0", {0: 0.3})), str(_run(tmp_path / "a_seed1", {100: 0.3}))]
    assert main([*args, "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and all(line.startswith("warning: ") for line in err if line not in errors)
    assert not (tmp_path / "f.png").exists()


def test_arm_names_drop_only_a_trailing_seed():
    from pathlib import Path

    assert arm_name(Path("out/sft_dual_seed12")) == "sft_dual"
    assert arm_name(Path("out/grpo-s3")) == "grpo"
    assert arm_name(Path("out/seedless")) == "seedless"
