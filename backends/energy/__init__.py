"""Energy meters: cumulative energy counters for the devices a backend runs on.

Every meter names its source (`nvml`, `prometheus`, `rapl`, `estimate`), and an estimate never
pretends to be a measurement: the ledger and every report carry the source beside the joules.
The meter kinds a tier may name, and the meter schema, are in `registry`.
"""
