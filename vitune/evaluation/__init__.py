"""Evaluation: task runners (`runner`: predict, then score) and metrics (`metrics`).

May import: what `vitune.inference` may, and `vitune.inference`.
"""
