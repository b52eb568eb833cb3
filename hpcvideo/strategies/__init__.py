"""Parallel strategies: dualparal/ (block queue + layer pipeline); videoinfinity/ comes later."""
