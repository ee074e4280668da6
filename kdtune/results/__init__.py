"""Results of finished studies: analysis, report, evaluation and export (no Ray import)."""
