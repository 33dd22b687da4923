"""How the command lines report errors: a bad input in one line (as jsonargparse reports a bad
option), jsonargparse's multi-line union reports condensed, and SIGTERM's exit code."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: Errors the project raises for bad input (options, files, data, weights, devices): before
#: training, the command line prints them as one ``error:`` line (:func:`input_errors_in_one_line`)
INPUT_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError,
                IsADirectoryError, FileExistsError, MisconfigurationException)  # fmt: skip

#: Set (to anything but ``0`` or empty) for the traceback of an input error too.
DEBUG_VARIABLE = "FEWSHOT_DEBUG"

#: The Lightning frame that runs the loops: an error raised under it happened during a run
#: (training, validation, test or prediction steps), a crash that keeps its traceback.
RUNNING_FRAME = "_run_stage"

#: Exit code of an input error, as jsonargparse's for a bad option.
INPUT_ERROR_EXIT = 2


@contextlib.contextmanager
def input_errors_in_one_line() -> Iterator[None]:
    """A project error raised for bad input before anything runs (:data:`INPUT_ERRORS`, not
    under Lightning's loops) ends the command with ``error: <message>`` on stderr and exit code
    :data:`INPUT_ERROR_EXIT`, as jsonargparse reports a bad option; ``FEWSHOT_DEBUG=1`` keeps
    the traceback. Other exceptions, and errors raised during steps, keep their traceback."""
    try:
        yield
    except INPUT_ERRORS as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0") or raised_while_running(error):
            raise
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message or type(error).__name__}", file=sys.stderr)
        raise SystemExit(INPUT_ERROR_EXIT) from None


def raised_while_running(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) passed through :data:`RUNNING_FRAME`."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        tb = link.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == RUNNING_FRAME:
                return True
            tb = tb.tb_next
        link = link.__cause__ or link.__context__
    return False


#: The exit code of a run stopped by SIGTERM, as a shell reports a process the signal ended.
SIGTERM_EXIT = 128 + signal.SIGTERM


@contextlib.contextmanager
def sigterm_exit_code() -> Iterator[None]:
    """Lightning stops ``fit`` on SIGTERM by raising ``SIGTERMException``, a ``SystemExit``
    without a code: the process would exit 0 as if training had finished. Exit with
    :data:`SIGTERM_EXIT` instead (``last.ckpt`` is saved by
    :class:`tasks.callbacks.checkpointing.SaveLastOnInterrupt` on the way)."""
    try:
        yield
    except SIGTERMException as stop:
        raise SystemExit(SIGTERM_EXIT) from stop


#: jsonargparse's wording when no alternative of a union type accepts a value
UNION_REPORT = "Does not validate against any of the Union subtypes"


def unwrap_union_error(error: BaseException) -> BaseException:
    """The project's own error inside jsonargparse's union reports (``__cause__`` chain)."""
    while error.__cause__ is not None and str(error).startswith(UNION_REPORT):
        error = error.__cause__
    return error


#: pydantic's pointers to its error catalogue, in the reports of ranges (datamodules.bounds)
PYDANTIC_NOISE = re.compile(
    r"\s*\[type=[^\]]*\]|\s*For further information visit \S+|(?<=\s)Value error, "
)


#: jsonargparse's reports of a value outside a closed set (that may also be null), on one line
LITERAL_REPORTS = (
    re.compile(
        UNION_REPORT + r" Subtypes: \[typing\.Literal\[(?P<values>[^\]]*)\](?P<null>, <class "
        r"'NoneType'>)?\] Errors: .*? Given value: (?P<given>.*)$"
    ),
    re.compile(
        r"Expected a typing\.Literal\[(?P<values>[^\]]*)\](?P<null>)\. Got value: (?P<given>.*)$"
    ),
)


#: pydantic's first line of a report, ``1 validation error for <the schema's repr>``: noise
PYDANTIC_HEADER = re.compile(r"^(?P<bullet>\s*(?:- )?)\d+ validation errors? for .*$", re.M)

#: jsonargparse's report of a number outside its range where the option also takes other types
#: (``--data.image_size 4``: an ``int >= 8`` or null; ``--data.test_seeds 0``: an ``int > 0``, a
#: list or null), the range's reason first
RANGE_UNION_REPORT = re.compile(
    UNION_REPORT + r" Subtypes: \[typing\.Annotated\[(?P<annotated>[^\]]*)\], (?P<others>.*?)\] "
    r"Errors: - (?P<reason>.*?) - Expected .*?Given value: (?P<given>.*)$"
)

#: an ``annotated_types`` bound in a type's repr (``Gt(gt=0)``)
BOUND = re.compile(r"\b(?:Gt|Ge|Lt|Le)\((?:gt|ge|lt|le)=(?P<bound>[^)]*)\)")

#: how the other alternatives of a union read in a one-line report
OTHER_TYPES = {"<class 'NoneType'>": "null"}


def _range_union(match: re.Match) -> str:
    """``greater than 0, a list or null, got '0'``: jsonargparse drops the given value from
    the alternatives' messages, so a bound equal to it is read back from the type."""
    reason = match["reason"][0].lower() + match["reason"][1:]
    bound = BOUND.search(match["annotated"])
    if bound and reason.endswith((" than", " to")):
        reason = f"{reason} {bound['bound']}"
    others = [OTHER_TYPES.get(t, "a list" if t.startswith("list[") else t)
              for t in re.split(r", (?![^\[]*\])", match["others"])]  # fmt: skip
    listed = ", ".join([reason, *others[:-1]])
    return f"{listed} or {others[-1]}, got {match['given']!r}"


def _allowed_values(match: re.Match) -> str:
    null = " or null" if match["null"] else ""
    return f"expected one of [{match['values']}]{null}, got {match['given']!r}"


def condense_union_report(message: str) -> str:
    """``Parser key "data": datamodules.ShapesFewShot: Parser key "shots": Expected ...`` from
    jsonargparse's multi-line report of a value no alternative of an optional class accepts;
    a closed set (``--data.protocol pfnet``) as its allowed values; another nested report (a
    ``class_path`` option) on one line."""
    message = PYDANTIC_HEADER.sub(r"\g<bullet>", PYDANTIC_NOISE.sub("", message))
    joined = " ".join(line.strip() for line in message.splitlines() if line.strip())
    for report in LITERAL_REPORTS:
        if report.search(joined):
            return report.sub(_allowed_values, joined)
    if RANGE_UNION_REPORT.search(joined):
        return RANGE_UNION_REPORT.sub(_range_union, joined)
    if UNION_REPORT not in message:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    lines = message.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if "- Problem with given class_path" in line), None
    )
    if start is None:
        return message
    indent = len(lines[start]) - len(lines[start].lstrip())
    own = [lines[start].strip().removeprefix("- Problem with given class_path ").rstrip(":")]
    for line in lines[start + 1 :]:
        if len(line) - len(line.lstrip()) <= indent:
            break
        own.append(line.strip())
    return " ".join([lines[0].strip(), *own])
