"""Measurements behind one design choice or one claim (methods, parity, thread counts, panel widths)."""
