"""How the ``mot`` commands talk to a person: errors, interrupts and MoT's own log lines.

* An error ends the command with one line, ``mot: error: <message>``, and exit status 2 for bad input
  (``ValueError``, ``TypeError``, a missing file) or 1 for anything else; ``--verbose`` (any command) prints the
  traceback as well.
* Ctrl-C and SIGTERM (what schedulers and ``kill`` send) stop the command with a line saying how to go on (for
  ``mot train``: the same command with ``--resume``), exit status 130 or 143.
* MoT's own INFO lines (what a resume reused, a folder started over) are printed while the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

VERBOSE_FLAG = "--verbose"
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError)
_EXIT_ON_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so ``finally`` blocks and the atomic writes clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """List ``--verbose`` in a command's help; :func:`run_command` takes it out of argv before the parser runs."""
    parser.add_argument(VERBOSE_FLAG, action="store_true", help="On an error, print the full traceback as well.")


def message(error: BaseException) -> str:
    """The error's own words: an OSError raised with (errno, text) and no file name, such as CheckpointWriteError,
    without the ``[Errno 28]`` prefix."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror and error.filename is None:
        return error.strerror
    return str(error)


def run_command(
    run: Callable[[list[str]], int | None],
    argv: Sequence[str] | None,
    on_interrupt: Callable[[list[str]], str] | None = None,
) -> int:
    """Run one command's ``run(argv)`` with the error, interrupt and logging behaviour of every ``mot`` command.

    Errors exit through ``SystemExit`` (as argparse's own usage errors do), success returns ``run``'s status.
    ``on_interrupt(argv)`` says how to continue after Ctrl-C/SIGTERM.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv
    argv = [a for a in argv if a != VERBOSE_FLAG]
    try:
        with _sigterm_interrupts(), _mot_log_lines():
            return int(run(argv) or 0)
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        if verbose:
            traceback.print_exc()
        hint = f" {on_interrupt(argv)}" if on_interrupt else ""
        print(f"\nmot: interrupted ({signal.Signals(signum).name}).{hint}", file=sys.stderr, flush=True)
        raise SystemExit(_EXIT_ON_SIGNAL.get(signum, 130)) from None
    except Exception as error:  # SystemExit (argparse) passes through untouched
        if verbose:
            traceback.print_exc()
        bad_input = isinstance(error, INPUT_ERRORS)
        hint = "" if bad_input or verbose else f"\nmot: run the command again with {VERBOSE_FLAG} for the traceback."
        print(f"mot: error: {message(error)}{hint}", file=sys.stderr, flush=True)
        raise SystemExit(2 if bad_input else 1) from None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` for the duration (main thread only; elsewhere it is left alone)."""

    def interrupt(signum, frame):
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signal handlers cannot be set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _mot_log_lines() -> Iterator[None]:
    """Print merge_of_thought's INFO and WARNING records on stderr while a command runs (the libraries' stay as
    they are configured)."""
    logger = logging.getLogger("merge_of_thought")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mot: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
