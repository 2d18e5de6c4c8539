"""Whole models, dense against factored, and the README's results table."""
