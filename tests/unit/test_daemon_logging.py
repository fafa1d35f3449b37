"""grpc's traceback for a write to a call its client already left is not an error of ours."""

from __future__ import annotations

import logging
import sys

from pdserve.server.daemon import _call_already_ended


def record(message: str) -> logging.LogRecord:
    try:
        raise RuntimeError("Failed execute_batch")
    except RuntimeError:
        exc_info = sys.exc_info()
    return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, message, None, exc_info)


def test_a_write_to_a_call_already_ended_is_kept_at_debug_only():
    logging.getLogger("pdserve").setLevel(logging.INFO)
    quiet = record("ExecuteBatchError raised in core by servicer method [/pdserve.v1.RouterService/Generate]")
    assert _call_already_ended(quiet) is False
    assert quiet.levelno == logging.DEBUG and quiet.exc_info is None
    other = record("Unexpected [RuntimeError] raised by servicer method")
    assert _call_already_ended(other) is True and other.levelno == logging.ERROR
