"""Losses live in submodules: kd, mil, projection, segmentation."""
