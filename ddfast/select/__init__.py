"""Choosing real examples as a source subset: the Random and K-means baselines (krr-st-selfsup §4.1)."""

from ddfast.select.kmeans import kmeans_select, random_select

__all__ = ["kmeans_select", "random_select"]
