"""`loopformer.runs.log.progress`: a bar on a terminal, nothing off one, the items unchanged either way."""

import io
import sys

from loopformer.runs.log import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only(monkeypatch):
    for stream, drawn in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress(iter(range(5)), "sweep val", total=5)) == [0, 1, 2, 3, 4]
        assert ("sweep val" in stream.getvalue() and "0/5" in stream.getvalue()) == drawn
        assert drawn or stream.getvalue() == ""


def test_a_bar_updated_by_hand_counts_bytes_on_a_terminal_only(monkeypatch):
    """`prepare` drew its own bar with carriage returns into pipes and CI logs: it now uses the same tqdm bar."""
    from loopformer.runs.log import progress_bar

    for stream, enabled, drawn in ((_Terminal(), True, True), (_Terminal(), False, False), (io.StringIO(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        with progress_bar("tokenize", 3_000_000, unit="B", enabled=enabled) as bar:
            bar.update(1_500_000)
        assert ("tokenize" in stream.getvalue() and "/3.00M" in stream.getvalue()) == drawn
        assert drawn or stream.getvalue() == ""


def test_a_bar_is_redrawn_while_one_item_takes_long(monkeypatch):
    """A rys setting over a 10,000-character probe, or one eval batch with exits, ran for minutes with a frozen
    bar: the bar is redrawn every few seconds however long an item takes, and the redrawing stops with it."""
    import time

    from loopformer.runs import log

    monkeypatch.setattr(log, "TICK_S", 0.05)
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    items = progress(iter(range(2)), "rys train", total=2)
    next(items)
    drawn = stream.getvalue().count("\r")
    time.sleep(0.5)  # the first item, taking long
    assert stream.getvalue().count("\r") >= drawn + 3
    assert list(items) == [1]
    closed = stream.getvalue()
    time.sleep(0.2)
    assert stream.getvalue() == closed  # no redraw after the bar closed
