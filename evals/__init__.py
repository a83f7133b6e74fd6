"""The offline eval harness: datasets, graders, outcome collection, metrics, and the training,
calibration and cross-validation of routers (the `collect`, `outcomes`, `eval` and `train`
commands). It builds on routers/ and backends/; serving never imports it."""
