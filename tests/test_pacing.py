"""Pacing of metadata reads: patience with a busy containerd, the full-read budget."""

from __future__ import annotations

from imagepushd.watch.pacing import BusyPatience, VerifyBudget


def test_busy_snapshots_back_off_and_are_said_once_when_they_last():
    patience = BusyPatience(first=0.05, maximum=0.4, patience=30.0)
    delays = []
    for now in (100.0, 100.1, 100.3, 100.7, 101.2, 110.0):
        delay, report = patience.failed(now)
        delays.append(delay)
        assert not report
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    assert patience.failed(130.0) == (0.4, True)  # 30 s since the first failure
    assert patience.failed(131.0) == (0.4, False)  # said once
    assert patience.failed(500.0) == (0.4, False)
    patience.succeeded()
    # A new spell starts afresh: short delays, and a new line only if it lasts again.
    assert patience.failed(600.0) == (0.05, False)
    assert patience.failed(629.9)[1] is False
    assert patience.failed(630.0)[1] is True


def test_a_short_busy_spell_is_never_said():
    patience = BusyPatience(patience=30.0)
    for start in (0.0, 100.0, 200.0):
        assert not any(patience.failed(start + t)[1] for t in (0.0, 10.0, 29.0))
        patience.succeeded()


def test_full_reads_are_due_at_once_while_the_budget_lasts_then_spaced_by_their_cost():
    budget = VerifyBudget(share=0.01, burst=3)
    assert budget.due(0.0) == 0.0  # nothing spent yet
    for _ in range(3):  # 30 ms each: a burst of three
        assert budget.due(0.0) == 0.0
        budget.spent(0.0, 0.03)
    # Nothing left, 30 ms needed: 3 s away at 1 % of the wall time.
    assert abs(budget.due(0.0) - 3.0) < 1e-9
    assert abs(budget.due(1.0) - 3.0) < 1e-9
    budget.spent(3.0, 0.03)
    assert abs(budget.due(3.0) - 6.0) < 1e-9  # from then on, one every 3 s
    # After a long quiet spell the burst is back: three reads, not more.
    assert budget.due(1000.0) == 1000.0
    for _ in range(3):
        budget.spent(1000.0, 0.03)
    assert budget.due(1000.0) > 1000.0


def test_the_burst_follows_what_a_read_costs():
    """Cheap reads (few images) are not let through by the dozen: the burst is in reads."""
    budget = VerifyBudget(share=0.01, burst=2)
    budget.spent(0.0, 0.5)  # the first reads of a large store: two at once
    assert budget.due(0.0) == 0.0
    budget.spent(0.0, 0.5)
    assert abs(budget.due(0.0) - 50.0) < 1e-9
    budget.spent(200.0, 0.001)  # the store shrank: two reads of 1 ms saved at most
    budget.spent(200.0, 0.001)
    assert abs(budget.due(200.0) - 200.1) < 1e-9


def test_a_clock_going_back_adds_nothing_to_the_budget():
    budget = VerifyBudget(share=0.01, burst=1)
    budget.spent(100.0, 0.1)
    assert abs(budget.due(50.0) - 110.0) < 1e-9
    assert abs(budget.due(100.0) - 110.0) < 1e-9
    assert budget.due(110.0) == 110.0
