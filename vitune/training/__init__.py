"""Training: the staged loop (`train`), and the metrics log it writes (`metrics_log`).

May import: `vitune.config`, `vitune.files`, `vitune.data`, `vitune.model`, `vitune.checkpoints`.
"""
