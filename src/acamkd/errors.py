"""The one clean message of an error shown to a user (the CLI prints it without a traceback).

A DataLoader worker's exception reaches the main process re-raised by torch as the same type
with the message ``"Caught X in DataLoader worker process N.\\nOriginal Traceback (most recent
call last): ..."`` (torch/_utils.py, ``ExceptionWrapper.reraise``): 40 lines of worker traceback
in front of the message that names the file and says what to do. :func:`user_message` gives
that original message back, with a short note of where it was raised.
"""
from __future__ import annotations

import ast
import re

__all__ = ["user_message"]

# torch's wrapper: "Caught <type name> <where>.\nOriginal Traceback (most recent call last):\n..."
# where: "in DataLoader worker process N", "in pin memory thread for device N", "in replica N on device M"
_WRAPPED = re.compile(r"\ACaught (?P<type>[\w.]+) (?P<where>in [^\n]*?)\.\nOriginal (?P<tb>Traceback \(most recent "
                      r"call last\):\n.*)\Z", re.S)
_TRACEBACK_START = "Traceback (most recent call last):"
_MAX_DEPTH = 5  # wrapped inside wrapped (a loader inside a worker): unwrap a few levels, then stop


def user_message(err: BaseException) -> str:
    """The message of ``err`` as its raiser wrote it: no traceback, no repr quotes (``KeyError``).

    A message re-raised by torch from a DataLoader worker (or a pin-memory thread, or a
    DataParallel replica) becomes the original exception's own message, its first line followed
    by ``" (in DataLoader worker process N)"``. Never raises; an empty message gives the type name.
    """
    try:
        text = _own_text(err)
        notes = []
        for _ in range(_MAX_DEPTH):
            m = _WRAPPED.match(text)
            if m is None:
                break
            inner = _final_exception_message(m["tb"], m["type"])
            if inner is None:  # not the layout we know: keep the whole text rather than guess
                break
            notes.append(m["where"])
            text = inner if inner.strip() else m["type"]
        text = text.strip() or type(err).__name__
        if notes:
            first, sep, rest = text.partition("\n")
            text = f"{first} ({', '.join(reversed(notes))}){sep}{rest}"
        return text
    except Exception:  # a message helper must never hide the error it describes
        return str(err) or type(err).__name__


def _own_text(err: BaseException) -> str:
    """``str(err)``, except a ``KeyError`` of one string gives that string (not its repr)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return str.__str__(err.args[0])
    return str(err)


def _final_exception_message(tb: str, type_name: str) -> str | None:
    """The message of the exception a formatted traceback ends with (``traceback.format_exception``:
    chained exceptions first, the raised one last), or ``None`` when ``tb`` does not end with an
    exception of ``type_name``."""
    lines = tb.rstrip("\n").split("\n")
    header = re.compile(rf"\A(?:[\w.]+\.)?{re.escape(type_name)}(?::(?: (?P<msg>.*))?)?\Z")
    starts = [i for i, line in enumerate(lines) if line == _TRACEBACK_START]
    for start in reversed(starts):  # the last traceback block is the raised exception's
        for i in range(start + 1, len(lines)):
            line = lines[i]
            if not line or line[0].isspace():  # frames ("  File ...", "    code", "    ^^^")
                continue
            m = header.match(line)
            if m is None:
                break  # another exception's block, or a message line that starts a column 0: try earlier
            message = "\n".join([m["msg"] or "", *lines[i + 1:]])
            if type_name == "KeyError":
                message = _unquote(message)
            return message
    return None


def _unquote(text: str) -> str:
    """``'name'`` -> ``name``: a KeyError prints the repr of its key."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, str) else text
