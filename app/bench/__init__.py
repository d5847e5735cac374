"""Benchmarks: variants side by side offline (`offline`), the running service (`served`), the official code
on our weights (`official`), all measured by `runner`; `plots` draws the results."""
