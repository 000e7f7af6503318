"""Data: synthetic tasks, text corpora and tokenizers, grain pipelines."""
