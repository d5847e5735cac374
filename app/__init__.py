"""VAR image generation served with compression.

The product: `model` (plain PyTorch), `compress` (passes and named variants), `quality` (image-quality
measurement), `serve` (the REST service). Tools beside it, never imported by it: `tools` (`python -m app
<tool>`), `bench` (`python -m app.bench`), `train` (`python -m app.train`).
"""
