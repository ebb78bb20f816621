"""Say what ran: a start and an end line by default (stderr), nothing with verbose=False, rows on request, a short
repr and a readable summary."""

from __future__ import annotations

import copy

import pytest

import orthograd as og
from orthograd.data import class_forgetting_split
from orthograd.data.splits import labels_of


@pytest.fixture(scope="module")
def class_sets(digits):
    train, test = digits
    split = class_forgetting_split(labels_of(train), forget_class=4, retain_size=200, seed=0)
    return (*split.datasets(train), test)


def test_a_default_run_says_what_it_runs_and_how_it_ended(digits_model, class_sets, capsys):
    forget, retain, test = class_sets
    with pytest.warns(UserWarning, match="without reaching the 'class' target"):
        result = og.unlearn(digits_model, forget, retain, test=test, stop="class", max_epochs=1)
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays the program's
    start, end = captured.err.strip().splitlines()
    for fact in ("orthograd starts", "schedule adaptive", "engine ", "held out 20 of the retain samples", "trains ",
                 "(LoRA on features.0, features.3", "budget 1 epoch", "stop 'class'"):
        assert fact in start, fact
    assert end.startswith(f"orthograd: orthograd max_epochs after {result.steps} steps (1 epoch,")
    assert f"forget {result.original['forget']:.2f} -> {result.final['forget']:.2f}" in end
    assert f"test {result.original['test']:.2f} -> {result.final['test']:.2f}" in end


def test_verbose_false_is_silent_and_rows_adds_a_line_per_history_row(digits_model, class_sets, capsys):
    forget, retain, test = class_sets
    og.unlearn(digits_model, forget, retain, test=test, stop="never", max_epochs=1, verbose=False)
    assert capsys.readouterr() == ("", "")
    result = og.unlearn(digits_model, forget, retain, test=test, stop="never", max_epochs=2, verbose="rows")
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == len(result.history)
    assert len(captured.err.strip().splitlines()) == 2
    with pytest.raises(ValueError, match="verbose must be one of"):
        og.unlearn(digits_model, forget, retain, verbose="loud")


def test_repr_is_short_and_summary_reads_as_a_table(digits_model, class_sets):
    forget, retain, test = class_sets
    result = og.unlearn(digits_model, forget, retain, test=test, stop="never", max_epochs=1, verbose=False)
    assert len(repr(result)) < 400 and "max_epochs" in repr(result) and "Parameter" not in repr(result)
    lines = result.summary().splitlines()
    assert lines[0].startswith(f"orthograd (seed 0): max_epochs after {result.steps} steps")
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:5]}
    assert rows["forget"] == pytest.approx([result.original["forget"], result.final["forget"]], abs=0.01)
    assert set(rows) == {"forget", "retain", "test"}


def test_a_damaged_run_says_so_in_its_end_line_and_summary(digits_model, class_sets, capsys):
    forget, retain, test = class_sets
    with pytest.warns(og.damage.RetainDamageWarning):
        result = og.unlearn(copy.deepcopy(digits_model), forget, retain, test=test, stop="class", lr=1e3)
    assert result.damaged
    assert "DAMAGED: " in capsys.readouterr().err.strip().splitlines()[-1]
    assert any(line.startswith("damaged: ") for line in result.summary().splitlines())


def test_the_image_bench_runs_unlearn_quietly_with_its_fixed_budget(tmp_path, capsys):
    from bench_helpers import run_test_phase
    from test_bench_runs import tiny_digits

    from orthograd.image_bench import experiment as image

    config, raw = tiny_digits(tmp_path, "protocol.seeds=[0]", "protocol.stop=false",
                              "methods={neggrad: {params: {lr: 1.0e-4, forget_batch_size: 32}}}")
    image._CONTEXTS.clear()
    try:
        (record,) = run_test_phase(config, raw, out_dir=tmp_path / "run")
    finally:
        image._CONTEXTS.clear()
    assert "orthograd starts" not in capsys.readouterr().err
    assert record["stop_reason"] == "max_epochs"  # stop=false: the whole budget, no inferred rule


@pytest.mark.parametrize("rank,printed", [(0, True), (1, False)])
def test_in_a_distributed_run_only_rank_zero_says_what_ran(monkeypatch, capsys, rank, printed):
    import torch.distributed as dist

    from orthograd import narration

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    narration.say("orthograd: a line")
    assert ("orthograd: a line" in capsys.readouterr().err) == printed
