"""The project's one error family.

Every error semloss_jax raises on purpose is a `SemlossError`; its message is one line that
says where (file and line, or config key), what is wrong and what to do. Each area has its own
subclass, and each subclass also derives from the builtin its callers would expect
(`ValueError` for bad input, `RuntimeError` for a run that cannot go on):

    SemlossError
    ├── ConfigError     a config value (YAML file, command-line override, model config.json)
    ├── ModelError      a model that cannot be loaded: weights, tokenizer, architecture
    ├── DataError       a data file or data set: file, line and field
    │   └── FetchError  a pinned archive that cannot be fetched or verified
    ├── LossError       arrays that do not fit a loss (shapes, missing batch fields)
    ├── ShardingError   a mesh or partitioning that does not fit the devices or the arrays
    ├── TrainError      a run that cannot start or go on
    │   ├── CheckpointError
    │   ├── NonFiniteLoss
    │   └── Interrupted a run stopped by SIGTERM / SIGINT after saving (exit code 128 + signal)
    └── EvalError       evaluation and report inputs

`cli_main` is how every entry point (train.py, eval.py, `python -m semloss_jax....`) reports
them: one line on stderr and exit code 2 (an error's own `exit_code` where it has one);
`--debug` shows the traceback instead. Ctrl-C outside a training loop is one line too (exit
code 130).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence


class SemlossError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(SemlossError, ValueError):
    """A bad config value: names the dotted key and the file and line it came from."""

    def __init__(self, message: str, key: str | None = None, file: str | None = None,
                 line: int | str | None = None):
        self.message, self.key, self.file, self.line = message, key, file, line
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        what = f"key {key!r}: " if key else ""
        super().__init__(f"{where}{what}{message}")

    def located(self, key: str | None, file: str | None, line: int | str | None) -> "ConfigError":
        """The same error placed at a config key and its file and line."""
        return ConfigError(self.message, key=key, file=file, line=line)


class ModelError(SemlossError, ValueError):
    """A model that cannot be built or loaded (weights, tokenizer, unsupported architecture)."""


class DataError(SemlossError, ValueError):
    """Bad input data; names the file, the line (or record/row) and the field."""

    def __init__(self, file: str | os.PathLike | None, line: int | str | None,
                 field: str | None, message: str):
        self.file = str(file) if file is not None else None
        self.line = None if line is None else str(line)  # "12", "record 3", "row 7"
        self.field = field
        self.message = message
        where = "" if self.file is None else (
            self.file if line is None else f"{self.file}:{line}")
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {message}" if where else f"{what.strip()} {message}".strip())


class FetchError(DataError):
    """A pinned registry archive that cannot be downloaded, verified or extracted."""

    def __init__(self, message: str, file: str | os.PathLike | None = None):
        super().__init__(file, None, None, message)


class LossError(SemlossError, ValueError):
    """Arrays that do not fit a loss or a divergence (shapes, dtypes, missing batch fields)."""


class ShardingError(SemlossError, ValueError):
    """A mesh or partitioning that does not fit the devices or the arrays."""


class TrainError(SemlossError, RuntimeError):
    """A training run that cannot start or go on."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be written or restored."""


class NonFiniteLoss(TrainError):
    """The loss or the parameters became NaN/inf; the message names the last good checkpoint."""


class Interrupted(TrainError):
    """A run stopped on SIGTERM / SIGINT after finishing its step and saving a checkpoint; the
    message names the checkpoint and the resume command. Exit code 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(message)


class EvalError(SemlossError, ValueError):
    """Bad evaluation or report input (sets, limits, result files)."""


class _DropLibraryTracebacks(logging.Filter):
    """Drops the ERROR records with a traceback that libraries write from their background
    threads and tasks (Orbax through absl, its asyncio write tasks): the same exception reaches
    the caller, which reports it in one line (a failed checkpoint save would otherwise print
    hundreds of lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)


_DROP_LIBRARY_TRACEBACKS = _DropLibraryTracebacks()  # one instance: addFilter is idempotent


@contextlib.contextmanager
def _quiet_library_noise():
    """While a CLI runs without --debug: _DropLibraryTracebacks on the "absl" and "asyncio"
    loggers, and no 'Event loop is closed' tracebacks (TensorStore callbacks of a save that
    already failed). When the run ends in an error the quieting stays until the process exits:
    Orbax's failed write tasks are reported by asyncio when they are garbage collected, which
    can be after the one-line error has been printed."""
    flt, old_hook = _DROP_LIBRARY_TRACEBACKS, sys.unraisablehook
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]

    def hook(u):  # TensorStore reports these through PyErr_WriteUnraisable
        if not (type(u.exc_value) is RuntimeError and str(u.exc_value) == "Event loop is closed"):
            old_hook(u)

    for lg in loggers:
        lg.addFilter(flt)
    sys.unraisablehook = hook
    yield  # an exception propagates from here and leaves the filters in place
    for lg in loggers:
        lg.removeFilter(flt)
    sys.unraisablehook = old_hook


def cli_main(prog: str, main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a SemlossError becomes one line `prog: error: ...` and exit code 2.

    `--debug` anywhere in argv is removed and lets the exception (and its traceback) through,
    with every library log record; without it, library tracebacks of errors that the project
    reports itself are left out (_quiet_library_noise).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        with contextlib.nullcontext() if debug else _quiet_library_noise():
            return int(main(args) or 0)
    except SemlossError as e:
        if debug:
            raise
        print(f"{prog}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
