"""Downpour: volunteer compute for asynchronous Downpour SGD."""
