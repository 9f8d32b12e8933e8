"""DoseDiff: distance-aware diffusion dose prediction (Zhang et al., IEEE TMI 2024).

A research and planning aid: it does not replace a treatment planning system's dose
calculation.
"""
__version__ = "0.1.0"
