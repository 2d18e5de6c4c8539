"""Op timings against their baselines, measured side by side (rows: ``benchmarks.tools.rows.Row``)."""
