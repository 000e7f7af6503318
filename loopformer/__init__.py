"""Loopformer: transformers with built-in looped circuits."""
