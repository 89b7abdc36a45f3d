"""Prefect flows: thin orchestration around the ``transferstudy`` engine.

python -m flows.study      # open -> decode -> study -> confirm -> refit -> report (demo by default)
python -m flows.prepare    # import and validate a dataset
python -m flows.report     # rebuild a study's report from its storage
"""

import os

#: Prefect settings every process of these flows runs with, set before Prefect reads its settings
#: (importing ``flows`` sets them; a work pool's run processes get them from the deployment).
PREFECT_ENV = {
    # Engine log lines (epochs, trials, decoding progress) also go to the Prefect flow-run logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "transferstudy",
    # Engine lines logged outside any flow run (the checks before a flow starts) stay on the
    # console only, without Prefect warning that they could not be sent to the API.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # No usage telemetry: it is a write the temporary server can fail with "database is locked".
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
for _name, _value in PREFECT_ENV.items():
    os.environ.setdefault(_name, _value)
