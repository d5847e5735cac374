"""Image-quality measurement: a feature network (the demo classifier by default) and the metrics on its features."""
