"""Datasets: Cityscapes in its official layout, and a synthetic stand-in in the same layout."""
