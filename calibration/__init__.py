"""Sample data for calibration and evaluation: readers, preprocessing, feeds for each backend."""
