"""Parallel strategies: dualparal/ (block queue + layer pipeline); videoinfinity/ (clip parallelism, dual-scope attention)."""
