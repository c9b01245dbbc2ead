"""Checkpoints: atomic mcore dist-checkpoints (dist.py) and HF import/export."""
