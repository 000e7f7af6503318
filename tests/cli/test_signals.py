"""SIGTERM and Ctrl-C end a command cleanly: its cleanup runs, the status says what happened (130 / 143), and
the process does not crash on the way out."""

import os
import signal
import subprocess
import sys
import time

import pytest

import loopformer.cli.inspect  # noqa: F401  (registers the command)
from loopformer.cli import Terminated, main
from loopformer.cli.common import COMMANDS
from loopformer.runs import stop


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_swallowed_signal_still_ends_with_its_status(run_dir, capsys, monkeypatch, sig, code, word):
    """Python drops an exception raised where it cannot propagate (a gc callback): the command then finished,
    and exited 0 as if never signalled. The signal is remembered and reported."""
    help_text, add_args, _ = COMMANDS["inspect"]

    def swallowing(args):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # interrupted by the handler
        except (Terminated, KeyboardInterrupt):
            pass  # what a gc callback does with it
        return 0

    before = signal.getsignal(sig)
    monkeypatch.setitem(COMMANDS, "inspect", (help_text, add_args, swallowing))
    assert main(["inspect", "--run", str(run_dir)]) == code
    assert f"{word} (the signal came where it could not stop the command" in capsys.readouterr().err
    assert signal.getsignal(sig) is before
    assert stop.requested() is None  # reported, then cleared: a later training in this process is not stopped


def test_an_interrupted_process_exits_without_the_interpreters_teardown(tmp_path):
    """Ctrl-C or SIGTERM during an XLA compile crashed at interpreter teardown (status 139). The console entry
    point ends the process at once after the command's cleanup, with the status of the signal."""
    script = ("import sys, atexit\n"
              "from loopformer.cli import Terminated, main\n"
              "import loopformer.cli.inspect\n"
              "from loopformer.cli.common import COMMANDS\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              "h, a, _ = COMMANDS['inspect']\n"
              "def killed(args):\n    raise Terminated\n"
              "COMMANDS['inspect'] = (h, a, killed)\n"
              f"sys.argv = ['loopformer', 'inspect', '--run', {str(tmp_path)!r}]\n"
              "sys.exit(main())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and done.stderr.strip().endswith("terminated"), done.stderr
    assert "teardown ran" not in done.stdout  # os._exit: no atexit handlers, no runtime teardown
