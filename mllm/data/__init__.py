"""Datasets and collators for training, and generators of data files (toy world, grounding preparation)."""
