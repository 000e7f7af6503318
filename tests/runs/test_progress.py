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
