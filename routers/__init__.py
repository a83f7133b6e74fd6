"""Serving-time routing for model `green`: the router kinds (models.py, one registry), the
cascade's confidence model, the policy that turns scores into a plan of tiers, the calibration
bound, the artifact, and the live RouterService. Training and evaluation live in the harness
(evals/), which imports this package; nothing here imports evals/ or the gateway."""
