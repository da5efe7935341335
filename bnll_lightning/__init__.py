"""bnll_lightning: supervised fine-tuning of causal LMs with probability-based objectives.

Every objective is a function of one number per target token, log p. It is computed once
(streamed, float32, masked) and consumed by objectives, α controllers, metrics and the diagnosis.
"""

__version__ = "0.1.0"
