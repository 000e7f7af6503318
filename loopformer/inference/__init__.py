"""Inference: generation at chosen loop counts (text continuations, task answers)."""
