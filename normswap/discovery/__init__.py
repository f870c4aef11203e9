"""Structural discovery: find a model's norms, writers and readers by measurement on a small instance."""
