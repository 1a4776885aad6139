"""Evaluation: CHAIR hallucination metric, grounding accuracy, VQA accuracy."""
