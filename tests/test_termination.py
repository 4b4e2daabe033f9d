"""SIGTERM unwinds through `finally` inside `sigterm_unwinds`, then ends the process as killed by it (a real
signal sent to a real child process)."""

import signal
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import os, signal, sys
    from labelcascade.termination import sigterm_unwinds

    with sigterm_unwinds():
        try:
            with sigterm_unwinds():  # nested, as `serve` inside the command line's main
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    print("not reached", flush=True)
                finally:
                    print("inner cleanup", flush=True)
        finally:
            print("outer cleanup", flush=True)
    print("not reached either", flush=True)
""")


def test_sigterm_runs_every_cleanup_then_ends_the_process_as_killed_by_it():
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["inner cleanup", "outer cleanup"], result.stderr
    assert result.returncode == -signal.SIGTERM


def test_outside_the_block_sigterm_is_handled_as_before():
    before = signal.getsignal(signal.SIGTERM)
    from labelcascade.termination import sigterm_unwinds

    with sigterm_unwinds():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
