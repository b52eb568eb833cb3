"""DualParal (arXiv 2505.21070): block-wise denoising queue, feature cache, stage-split forward.

``spec`` (checks, stage split, builder for :mod:`hpcvideo.runner`), ``pipeline`` (the multi-rank executor),
``reference`` (the single-process executor), ``queue`` (the tick schedule), ``forward`` and ``attention``."""
