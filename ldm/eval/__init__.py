"""Metrics: shapes prompt adherence (`ldm.eval.adherence`), held-out loss, FID/CLIP score when weights exist."""
