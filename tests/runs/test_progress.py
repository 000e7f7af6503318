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
