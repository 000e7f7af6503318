"""The model: layers, the loop mechanics, circuits and banks, the run plan, the transformer."""
