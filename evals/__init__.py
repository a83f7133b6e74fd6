"""The offline eval harness: datasets, graders, outcome collection and metrics (issue 5)."""
