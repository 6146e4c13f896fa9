"""End-to-end runs of the distillers: data, artifacts, baselines, result tables."""
