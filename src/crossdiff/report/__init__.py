"""Figures (figures.py, the analysis stage) and the static HTML report (collect, tables, tokens, html)."""
