"""Image-quality measurement: feature networks (the demo classifier and the mixer by default), the metrics on
their features, their uncertainty and the verdicts against the baseline."""
