"""Ctrl-C and SIGTERM: every program ends with one line that says what was done and how to go on, exit
128 + signal, never a traceback. The program imports this first, before torch, so that a Ctrl-C while
torch loads ends the same way; a few renames that must not stop halfway hold the signals back.
"""
import contextlib
import os
import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM, raised wherever the program is, so that every cleanup runs (the
    temporary files of atomic writes, the lock). The programs end it with one line, exit 128 + signal."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signum)
        self.signum = signum

    @property
    def code(self):
        return 128 + self.signum

    @property
    def what(self):
        return "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else f"stopped by {signal.Signals(self.signum).name}"


def interrupted(e):
    """The Interrupted behind a KeyboardInterrupt (Python raises a plain one before stop_on_signals runs)."""
    return e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)


def exit_interrupted(program, e, otherwise="", quiet=False):
    """End a program stopped by Ctrl-C or SIGTERM: one line (the stop's own message, else what happened and
    `otherwise`), exit 128 + signal. Signals are ignored while the line is printed: a second Ctrl-C right
    after the first must not turn it into a traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    stop = interrupted(e)
    if not quiet:
        print(f"{program}: {getattr(stop, 'message', None) or stop.what + otherwise}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(stop.code)


def die_with_parent(sig=signal.SIGTERM):
    """Ask Linux to send this process sig when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))
        except (OSError, AttributeError):
            pass


def stop_on_signals():
    """From now on SIGINT and SIGTERM raise Interrupted in the main thread."""
    def handler(signum, frame):
        raise Interrupted(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def quit_while_starting(program):
    """Before the heavy imports of a command line: Ctrl-C or SIGTERM while torch loads ends the program with
    one line (nothing has begun), where Python would print a traceback. main() then calls stop_on_signals.
    It leaves with os._exit, not SystemExit: a library's bare `except:` around an optional import would
    swallow the exception, and the program would go on after saying that nothing was done."""
    def handler(signum, frame):
        try:  # a closed stderr must not keep the program from ending either
            os.write(2, f"{program}: {Interrupted(signum).what} while starting: nothing was done\n".encode())
        finally:
            os._exit(128 + signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM back for a few renames that must not stop halfway. Yields the list of the
    signals that came meanwhile: the caller raises Interrupted for the first once its state is whole."""
    came = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_held(came):
    """After signals_held: raise Interrupted for the first signal that came, if one did."""
    if came:
        raise Interrupted(came[0])
