"""SIGTERM and Ctrl-C end a command cleanly: its cleanup runs, the status says what happened (130 / 143), and
the process does not crash on the way out."""

import os
import signal
import subprocess
import sys
import time
import types

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


def test_a_second_signal_ends_a_long_compiled_call_at_once(tmp_path):
    """Python runs a signal's handler only between its own instructions: during one compiled call that runs for
    minutes, SIGTERM (and a second, and a third) waited for it to return (#27 pass 41's leftover). The second signal
    now ends the process at once, with the signal's status (Ctrl-C's path is the same, with 130)."""
    sig, code, word = signal.SIGTERM, 143, "terminated"
    script = ("import sys\n"
              "import jax, jax.numpy as jnp\n"
              "from loopformer.cli import main\n"
              "import loopformer.cli.inspect\n"
              "from loopformer.cli.common import COMMANDS\n"
              "h, a, _ = COMMANDS['inspect']\n"
              "def long_call(args):\n"
              "    f = jax.jit(lambda x: jax.lax.fori_loop(0, 10**9, lambda i, v: jnp.sin(v) + 1.0, x))\n"
              "    f = f.lower(jnp.zeros(256)).compile()\n"
              "    print('ready', flush=True)\n"
              "    f(jnp.zeros(256)).block_until_ready()\n"
              "    return 0\n"
              "COMMANDS['inspect'] = (h, a, long_call)\n"
              f"sys.argv = ['loopformer', 'inspect', '--run', {str(tmp_path)!r}]\n"
              "sys.exit(main())\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # inside the compiled call
        child.send_signal(sig)
        time.sleep(0.5)
        assert child.poll() is None  # the first waits for the call, as Python's handlers do
        child.send_signal(sig)
        assert child.wait(timeout=30) == code
        assert f"{word} at once (a second signal while the first waited" in child.stderr.read()
    finally:
        child.kill()
        child.wait()


def test_a_signal_after_the_command_finished_keeps_its_status(tmp_path):
    """A signal that landed after the command had done its work (while the interpreter exits) gave 130 / 143
    with the output complete, as if it had been interrupted: the console script's status is the command's."""
    script = ("import os, signal, sys, time\n"
              "from loopformer.cli import main\n"
              f"code = main(['inspect', '--run', {str(tmp_path / 'none')!r}], process=True)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(0.2)\n"
              "print('exiting', code)\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "exiting 2" in done.stdout, (done.returncode, done.stderr)
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr, done.stderr


def test_after_a_signal_the_libraries_leftovers_print_no_tracebacks(monkeypatch, capsys):
    """SIGTERM during `import`'s checkpoint save printed "RuntimeError: Event loop is closed" tracebacks (its I/O
    threads calling back into the loop the signal closed), and a Ctrl-C that JAX's gc callback swallowed printed
    "Exception ignored in: <function _xla_gc_callback>", above the one line; other errors still print."""
    from loopformer import cli

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    cli._quiet_noise()
    cli._quiet_noise()  # once per process, however many signals
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    for error in (KeyboardInterrupt(), Terminated(), RuntimeError("Event loop is closed")):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                                 err_msg=None, object=None))
    # a checkpoint's other array reads, left pending when one failed on a truncated file (#27 pass 22: each printed a
    # 30-line TensorStore traceback below the step's one "corrupt" line)
    pending = types.SimpleNamespace(__name__="_read_array_index_and_device_put")
    error = Exception("Encountered error while reading array index")
    sys.unraisablehook(types.SimpleNamespace(exc_type=Exception, exc_value=error, exc_traceback=None, err_msg=None,
                                             object=pending))
    assert capsys.readouterr().err == ""
    sys.excepthook(ValueError, ValueError("a real bug"), None)
    assert capsys.readouterr().err.strip() == "ValueError: a real bug"


def test_a_ctrl_c_swallowed_while_the_commands_import_still_interrupts(monkeypatch, capsys):
    """Ctrl-C in the first second, where JAX's gc callback swallowed its KeyboardInterrupt, let the command run to
    the end with status 0: the handler is installed before the imports and the recorded signal checked after."""
    from loopformer import cli

    real = cli.importlib.import_module

    def import_module(name):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted by the handler
        except KeyboardInterrupt:
            pass  # what the gc callback does with it
        return real(name)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # _quiet_noise replaces it
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    assert main(["inspect", "--run", "/nonexistent"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_the_temporary_run_of_an_interrupted_save_is_removed_even_if_written_to_meanwhile(tmp_path):
    """A signal during `import` / `convert`'s save left `.NAME.partial-PID/checkpoints/0.orbax-checkpoint-tmp/`:
    the library's writer threads made it again after the one removal. The removal is repeated until it stays gone."""
    import threading

    from loopformer.train.newrun import _discard

    tmp = tmp_path / ".run.partial-1"
    (tmp / "checkpoints").mkdir(parents=True)
    late = threading.Timer(0.02, lambda: (tmp / "checkpoints" / "0.orbax-checkpoint-tmp").mkdir(parents=True))
    late.start()
    _discard(tmp)
    late.join()
    assert not tmp.exists()


@pytest.mark.parametrize("platforms", ["nonsense", "tpu"])
def test_a_platform_jax_cannot_start_is_one_line(tmp_path, platforms):
    """#27 pass 9: JAX_PLATFORMS=gpu / tpu / a typo on a machine without it was 100+ lines of traceback from the
    command's first JAX call (after `train` had made its run directory)."""
    env = {**os.environ, "JAX_PLATFORMS": platforms}
    done = subprocess.run([sys.executable, "-m", "loopformer", "train", "-c", "configs/quickstart.yaml",
                           f"run.dir={tmp_path}", "run.name=r"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: JAX_PLATFORMS='{platforms}': JAX cannot start it on this machine (")
    assert done.stderr.strip().endswith("unset JAX_PLATFORMS to use what the machine has (or name one it has, e.g. "
                                        "JAX_PLATFORMS=cpu)") and done.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("env, start", [
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=0"}, "error: XLA_FLAGS='--xla_force_host_platform_device"
                                                                "_count=0': JAX cannot start its backend with these "
                                                                "flags ("),
    ({"JAX_DEFAULT_MATMUL_PRECISION": "bogus"}, "error: JAX_DEFAULT_MATMUL_PRECISION='bogus': JAX refuses it ("),
    ({"JAX_ENABLE_X64": "maybe"}, "error: JAX_ENABLE_X64='maybe': JAX refuses it ("),
    # #27 pass 41: XLA aborted the process from C++ (status 1: "F... Unknown flag in XLA_FLAGS", or a value of the
    # wrong kind with its 90-line list of flags)
    ({"XLA_FLAGS": "--xla_bogus_flag=1"}, "error: XLA_FLAGS='--xla_bogus_flag=1': XLA refuses it (Unknown flag in "
                                          "XLA_FLAGS: --xla_bogus_flag=1); fix or unset XLA_FLAGS"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=abc"}, "error: XLA_FLAGS='--xla_force_host_platform_device_"
                                                                  "count=abc': XLA refuses it (Couldn't interpret value "
                                                                  "abc for flag"),
])
def test_a_jax_variable_jax_refuses_is_one_line(tmp_path, env, start):
    """#27 pass 23: a JAX setting read from the environment as JAX is imported (a typo) was a ValueError traceback
    through `import jax`; a device count of 0 in XLA_FLAGS a RuntimeError traceback from the first JAX call."""
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}, **env}
    done = subprocess.run([sys.executable, "-m", "loopformer", "train", "-c", "configs/quickstart.yaml",
                           f"run.dir={tmp_path}", "run.name=r"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stderr.startswith(start) and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "r").exists()


def test_xla_flags_a_parent_checked_are_not_checked_again(monkeypatch):
    """The child process that checks XLA_FLAGS (~2 s) runs once per value down a tree of processes: a value a parent
    checked (or the test harness set) is in LOOPFORMER_XLA_FLAGS_CHECKED, and a new value is checked and then put
    there for the command's own children."""
    import jax._src.xla_bridge as xb

    from loopformer import cli

    started = []
    monkeypatch.setattr(xb, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: started.append(a) or types.SimpleNamespace(returncode=0))
    monkeypatch.setenv(cli.FLAGS_CHECKED, "--xla_a=1")
    assert cli.xla_flags_refused("--xla_a=1") is None and started == []
    assert cli.xla_flags_refused("--xla_b=1") is None and len(started) == 1
    assert os.environ[cli.FLAGS_CHECKED] == "--xla_b=1"


@pytest.mark.parametrize("home", ["", "relative/home"])
def test_a_home_that_names_no_home_directory_is_not_read_for_a_tilde(monkeypatch, home):
    """#27 pass 41: with HOME='' `run.dir=~/x` trained into /x, at the root of the file system (and a relative HOME
    under the current directory), with no word; `~` then reads the user's home from the password database."""
    import pwd
    from pathlib import Path

    from loopformer.cli import home_from_passwd

    monkeypatch.setenv("HOME", home)
    home_from_passwd()
    assert "HOME" not in os.environ
    assert Path("~/x").expanduser() == Path(pwd.getpwuid(os.getuid()).pw_dir) / "x"
    monkeypatch.setenv("HOME", "/somewhere")
    home_from_passwd()
    assert os.environ["HOME"] == "/somewhere"
