"""`python -m app <tool> ...`: weights, generate, evaluate, fidelity, conformance, sensitivity or gpu-check
(`--help` after it)."""

from __future__ import annotations

import importlib
import sys

TOOLS = {
    "weights": "download released weights (d16..d36) from the Hugging Face Hub, verify them, lay out model_store/",
    "generate": "generate images of one class as a PNG grid and show where the time went",
    "evaluate": "image quality of variants on the same (class, seed) list",
    "fidelity": "the KL and top-1 agreement shadow fidelity reports for each variant, measured offline",
    "conformance": "check the model against outputs of the official VAR code",
    "sensitivity": "quality with one layer type at a time in int8",
    "gpu-check": "what a lent GPU machine runs: conformance on the device, memory, the d16 benchmark",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        lines = "\n".join(f"  {name:<12} {summary}" for name, summary in TOOLS.items())
        print(f"usage: python -m app <tool> [--help]\n\ntools:\n{lines}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    tool = importlib.import_module(f"app.tools.{argv[0].replace('-', '_')}")  # one tool's imports, not all
    result: int = tool.main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main())
