"""Training: losses, trainers (SFT, preference) and their argument dataclasses."""
