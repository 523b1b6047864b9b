"""Logging that never carries request text or image content, from any layer.

Our own modules log ids, sizes, counts and timings only. Other layers are the risk: pydantic's
validation errors quote the offending input ("input_value='Patient Doe^Jane ...'"), Gradio
prints tracebacks of failed events to stderr, and any exception's message may echo what a
client sent. So: every log record's exception is rendered as its type and stack frames without
its message (`RedactingFormatter`), and Gradio's direct traceback printing goes through that
same rendering (`quiet_gradio_tracebacks`).
"""

from __future__ import annotations

import logging
import sys
import traceback

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_WITHHELD = "(message withheld: it may quote request content)"


def exception_summary(exc: BaseException) -> str:
    """A traceback with file, line and function of each frame and the exception's type, never its
    message (nor those of the exceptions it was chained from)."""
    lines = []
    for frame in traceback.extract_tb(exc.__traceback__):
        lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
    lines.append(f"{type(exc).__module__}.{type(exc).__qualname__} {_WITHHELD}")
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        lines.insert(0, exception_summary(cause) + "\nwhich led to:")
    return "Traceback (most recent call last):\n" + "\n".join(lines)


class RedactingFormatter(logging.Formatter):
    """Formats exceptions with `exception_summary`, and a log call's arguments only when they
    are numbers (a stray `log.info("... %s", user_text)` in a library shows as its template)."""

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return exception_summary(ei[1]) if ei and ei[1] is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith(("pydantic", "fastapi", "gradio", "httpx", "httpcore")) and record.args:
            record.msg, record.args = f"{record.msg} {_WITHHELD}", None
        record.exc_text = None  # never reuse a text another handler rendered with the message
        return super().format(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Root logging for `medvlm serve`: one stderr handler with RedactingFormatter, which the
    uvicorn loggers (started with log_config=None) propagate to."""
    handler = _StderrHandler()
    handler.setFormatter(RedactingFormatter(FORMAT))
    # A failing handler would print the record's exception, chained context and message included,
    # to stderr ("--- Logging error ---"): unredacted. Drop such records silently instead.
    logging.raiseExceptions = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # paths can carry file names
    logging.getLogger("httpx").setLevel(logging.WARNING)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced after start-up)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property decides
        pass


class _QuietTraceback:
    """Stands in for the `traceback` module inside Gradio's modules: what Gradio prints with
    print_exc() (a failed event, a validation error quoting the input) goes to our log as a
    redacted summary instead of to stderr verbatim. Everything else is the real module."""

    def __getattr__(self, name):
        return getattr(traceback, name)

    @staticmethod
    def print_exc(*args, **kwargs) -> None:
        exc = sys.exc_info()[1]
        if exc is not None:
            logging.getLogger("serve.gradio_events").error("a Gradio event failed:\n%s", exception_summary(exc))

    @staticmethod
    def format_exc(*args, **kwargs) -> str:
        exc = sys.exc_info()[1]
        return exception_summary(exc) if exc is not None else ""


def quiet_gradio_tracebacks() -> None:
    """Route Gradio's own traceback printing through `exception_summary` (idempotent)."""
    import gradio.queueing
    import gradio.route_utils
    import gradio.routes
    import gradio.utils

    for module in (gradio.queueing, gradio.routes, gradio.utils, gradio.route_utils):
        module.traceback = _QuietTraceback()
