"""Turning images and chat messages into model inputs: slicing (`image_processing.py`) and prompts (`processor.py`)."""
