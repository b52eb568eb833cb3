"""hpcvideo: distributed long-video diffusion inference (DualParal, Video-Infinity) with resumable Zarr run stores."""

__version__ = "0.1.0"
