"""Prefect flows over ``dala_model``: orchestration only.

The library logs under ``dala_model`` (per-epoch training lines, ingest and launch notes). Its
level is INFO here so that, with ``PREFECT_LOGGING_EXTRA_LOGGERS=dala_model`` (set by the
Makefile, the deployments and the images), those lines land in each flow run's logs.
"""

import logging

logging.getLogger("dala_model").setLevel(logging.INFO)
