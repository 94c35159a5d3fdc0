"""Prefect flows over the stages, and the `alignflow` command line."""

import os

# Set before Prefect is first imported, by whichever module of this package imports it first.
# The temporary local Prefect server can take longer than its default 20 s to start on a busy 2-core box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Offline machines: the temporary server's telemetry call can only fail and log an ERROR line.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
