"""The polling window: where each poll starts and stops reading the HIS."""

from __future__ import annotations

from datetime import datetime

from sync.his import polling_window

NOW = datetime(2024, 5, 20, 10, 0, 0)
START = datetime(2024, 4, 19)


def test_first_run_back_fills_from_start_from_up_to_the_settle_delay() -> None:
    window = polling_window(None, db_now=NOW, start_from=START, lookback_s=600, settle_delay_s=60)
    assert window == (START, datetime(2024, 5, 20, 9, 59, 0))


def test_later_polls_re_read_the_lookback_behind_the_cursor() -> None:
    cursor = datetime(2024, 5, 20, 9, 50, 0)
    window = polling_window(cursor, db_now=NOW, start_from=START, lookback_s=600, settle_delay_s=60)
    assert window == (datetime(2024, 5, 20, 9, 40, 0), datetime(2024, 5, 20, 9, 59, 0))


def test_start_from_is_ignored_once_there_is_a_cursor() -> None:
    cursor = datetime(2024, 1, 1)
    window = polling_window(cursor, db_now=NOW, start_from=START, lookback_s=0, settle_delay_s=0)
    assert window == (cursor, NOW)


def test_rows_younger_than_the_settle_delay_wait_for_the_next_poll() -> None:
    cursor = datetime(2024, 5, 20, 9, 59, 30)
    # until = 09:59:00 is before the cursor even without lookback: nothing to read yet.
    assert polling_window(cursor, db_now=NOW, start_from=START, lookback_s=0, settle_delay_s=60) is None


def test_an_empty_window_is_none_not_a_zero_width_read() -> None:
    cursor = datetime(2024, 5, 20, 10, 0, 0)
    assert polling_window(cursor, db_now=NOW, start_from=START, lookback_s=0, settle_delay_s=0) is None


def test_a_start_from_in_the_future_reads_nothing() -> None:
    future = datetime(2024, 6, 1)
    assert polling_window(None, db_now=NOW, start_from=future, lookback_s=600, settle_delay_s=60) is None


def test_lookback_reaches_back_exactly_that_many_seconds() -> None:
    cursor = datetime(2024, 5, 20, 9, 0, 0)
    since, until = polling_window(cursor, db_now=NOW, start_from=START, lookback_s=3600, settle_delay_s=0) or (None, None)
    assert since == datetime(2024, 5, 20, 8, 0, 0)
    assert until == NOW
