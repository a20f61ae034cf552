"""Seed 000's Python use case: an alert condition with pandas, ``df['value'].std() > threshold``.

Runtime ``python3.11``, handler ``trace.handler``. pandas comes from the runtime image's vetted set
(GET /v1/runtimes): the bundle is this one file. The rows arrive in the task's ``config`` (a job's
``config: {rows: [...], threshold: ...}``, or a previous job's output passed as parameters); the handler
answers the alert rows the platform publishes into the job's output dataset.
"""

import pandas as pd


def handler(event, context):
    config = event["config"]
    threshold = float(config["threshold"])
    df = pd.DataFrame(config["rows"])
    alerts = []
    for address, group in df.groupby("address", sort=True):
        std = group["value"].std()
        if std > threshold:  # the seed's condition, per address
            alerts.append({"address": address, "std": round(float(std), 6), "samples": len(group),
                           "threshold": threshold})
    return {"rows": alerts}
