"""vitune: visual instruction tuning.

image(s) + instruction -> processor -> vision encoder -> connector -> language model -> loss | answer.
"""

__version__ = "0.1.0"
