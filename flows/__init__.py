"""Prefect flows: thin orchestration around the ``transferstudy`` engine.

python -m flows.study      # open -> decode -> study -> confirm -> refit -> report (demo by default)
python -m flows.prepare    # import and validate a dataset
python -m flows.report     # rebuild a study's report from its storage
"""

import os

# Engine log lines (epochs, trials, decoding progress) also go to the Prefect flow-run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "transferstudy")
# Engine lines logged outside any flow run (the checks before a flow starts) stay on the
# console only, without Prefect warning that they could not be sent to the API.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# No usage telemetry: it is a write the temporary server can fail with "database is locked".
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
