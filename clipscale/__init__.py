"""clipscale: large-batch contrastive image-text pretraining with exact global gradients."""

__version__ = "0.1.0"
