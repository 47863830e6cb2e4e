"""cpkp: Co-Progression Knowledge Distillation with a Knowledge Prototype.

Unsupervised industrial visual anomaly detection trained on normal images only.
"""

__version__ = "0.1.0"
