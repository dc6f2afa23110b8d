"""Prefect flows: thin wrappers over the quantvggt library (quantize once, reconstruct in batches on Ray).

Importing this package routes the library's log records to the Prefect run's logs: Prefect's own
``PREFECT_LOGGING_EXTRA_LOGGERS`` setting (set here unless the environment sets it, and applied again by
:func:`route_library_logs`, which each flow module calls, for when Prefect was imported first, as in a worker's
flow-run process).
"""

from __future__ import annotations

import logging
import os

LIBRARY_LOGGERS = ("quantvggt", "workers")

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(LIBRARY_LOGGERS))
# library lines logged outside any run (the CLI, the demo's set-up) are not for the API: no warning per line
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# the temporary server the demo and local runs start would phone home and, offline (clusters, CI), log an ERROR that
# reads like a failed run; opt in with PREFECT_SERVER_ANALYTICS_ENABLED=true
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def route_library_logs() -> None:
    """Attach Prefect's API log handler to the library's loggers at INFO, as ``PREFECT_LOGGING_EXTRA_LOGGERS`` does.

    Prefect applies that setting once, when it is first imported; a flow-run process imports Prefect before our
    flows, so the handler is added here too (once). INFO, because the loggers otherwise inherit the root's WARNING.
    """
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        """Prefect's API log handler, silent outside flow and task runs (the CLI, a test, a library call)."""

        def emit(self, record: logging.LogRecord) -> None:
            if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
                super().emit(record)

    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(RunLogHandler())
