"""The few values data and model must agree on, owned by neither: how a label says "no loss here"
and how packed rows number their segments. Both `vitune.data` and `vitune.model` import them.
"""

IGNORE_INDEX = -100  # a label position without loss (PyTorch's cross-entropy default)
PREFIX_SEGMENT = 0  # packed rows: the shared prefix (system prompt, image tokens) every segment sees
PAD_SEGMENT = -1  # packed rows: padding, a segment that no real token attends to
# Where an image goes inside a message's text: U+FFFC, Unicode's "object replacement character".
# Only structure puts it there (a LLaVA file's `<image>` tag, an image given beside a question);
# text that holds it itself is refused, and a literal `<image>` in a question is just text.
IMAGE_SLOT = "\ufffc"
