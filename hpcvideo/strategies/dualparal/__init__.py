"""DualParal (arXiv 2505.21070): block-wise denoising queue, feature cache, stage-split forward."""
