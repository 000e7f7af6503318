"""Evaluation: the compiled evaluator, answer metrics, ablation, loop sweeps, tables and plots."""
