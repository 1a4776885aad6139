"""The model: Qwen2-family LLM (`llm.py`), SigLIP NaViT vision encoder (`vision.py`), perceiver resampler
(`resampler.py`) and their fusion (`modeling.py`)."""
