"""Figures (PNG): confusion matrices, toy-world contact sheets, probability maps, foreground-bias plots."""
