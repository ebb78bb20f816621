"""The run facts the benchmark protocol compares: how often the stop rule was checked, and how many epochs ran."""

import orthograd as og
from orthograd.data import class_forgetting_split
from orthograd.data.splits import labels_of


def test_a_check_on_an_epochs_last_step_counts_that_epoch_and_every_check_is_counted(digits, digits_model):
    train, test = digits
    split = class_forgetting_split(labels_of(train), forget_class=3, retain_size=200, seed=0)
    forget, retain = split.datasets(train)
    # one step an epoch, a check after every step: every check that fires is on an epoch's last step
    result = og.unlearn(digits_model, forget, retain, test=test, stop="class", method="orthograd-fixed",
                        optimizer="adam", lr=3e-3, alpha=0.5, forget_batch_size=len(forget), retain_batch_size=64,
                        eval_every=1, max_epochs=30, seed=0)
    assert result.stop_reason == "target_reached" and result.steps >= 2
    assert result.epochs == result.steps  # not one less: the epoch whose last step reached the target counts
    assert result.final["epoch"] == result.epochs
    # the step-0 row, then one check per step: the epoch's row after a probe of the same state is not a new check
    assert result.stop_checks == 1 + result.steps


def test_the_controller_reads_each_checked_state_once(digits, digits_model, monkeypatch):
    """An epoch-end row on a state a probe just judged must not reach the controller as a second, progress-free
    check (it would read as a stall and raise the pressure)."""
    from orthograd.methods.orthograd.controller import AdaptiveController

    observed_steps: list[int] = []
    original_observe = AdaptiveController.observe

    def counting_observe(self, metrics, model):
        observed_steps.append(self.steps)
        return original_observe(self, metrics, model)

    monkeypatch.setattr(AdaptiveController, "observe", counting_observe)
    train, test = digits
    split = class_forgetting_split(labels_of(train), forget_class=3, retain_size=200, seed=0)
    forget, retain = split.datasets(train)
    # two steps an epoch, a check every step: every epoch's last step is both probed and given a row
    result = og.unlearn(digits_model, forget, retain, test=test, stop="class", retain_batch_size=64,
                        forget_batch_size=(len(forget) + 1) // 2, eval_every=1, max_epochs=3, seed=0)
    assert result.steps >= 2
    assert len(observed_steps) == result.steps == result.stop_checks - 1
    assert len(set(observed_steps)) == len(observed_steps)  # never the same step twice
    # without a stop rule the schedule still steers on its rows: each state is read once there too
    observed_steps.clear()
    result = og.unlearn(digits_model, forget, retain, stop="never", retain_batch_size=64,
                        forget_batch_size=(len(forget) + 1) // 2, eval_every=1, max_epochs=2, seed=0)
    assert result.stop_checks == 0 and len(observed_steps) == result.steps == 4
    assert len(set(observed_steps)) == len(observed_steps)


def test_without_a_stop_rule_nothing_is_checked(digits, digits_model):
    train, _ = digits
    split = class_forgetting_split(labels_of(train), forget_class=3, retain_size=100, seed=0)
    forget, retain = split.datasets(train)
    # stop="never": without it the class rule would be inferred (the forget set is one whole class)
    result = og.unlearn(digits_model, forget, retain, method="neggrad", stop="never", max_epochs=1, eval_every=1,
                        seed=0)
    assert result.stop_checks == 0 and result.epochs == 1 and result.steps >= 1
