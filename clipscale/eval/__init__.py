"""Evaluation: zero-shot classification, retrieval and embedding geometry."""
