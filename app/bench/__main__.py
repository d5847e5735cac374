"""`python -m app.bench [serve|load|refusals|kernels|decoder|attention|policies|fidelity] ...`: the offline
benchmark, with `serve` the serving benchmark, with `load` the load and soak test (`app.bench.load`), with
`refusals` the server's CPU per refused request (`app.bench.refusals`), with `kernels` each layer kind's kernel
options side by side (`app.bench.kernels`), with `decoder` the VQVAE decoder's forms side by side
(`app.bench.decoder`), with `attention` windowed attention against dense per scale (`app.bench.attention`), with
`policies` the whole and scale batching policies under the same load (`app.bench.policies`), with `fidelity` what
shadow fidelity costs the clients (`app.bench.fidelity_cost`)."""

from __future__ import annotations

import sys

from app.bench import decoder, kernels, offline, served
from app.bench.load import cli as load


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return served.main(argv[1:])
    if argv[:1] == ["load"]:
        return load.main(argv[1:])
    if argv[:1] == ["refusals"]:
        from app.bench import refusals  # imported on use: it imports the service

        return refusals.main(argv[1:])
    if argv[:1] == ["kernels"]:
        return kernels.main(argv[1:])
    if argv[:1] == ["policies"]:
        from app.bench import policies  # imported on use, as attention

        return policies.main(argv[1:])
    if argv[:1] == ["fidelity"]:
        from app.bench import fidelity_cost  # imported on use, as attention

        return fidelity_cost.main(argv[1:])
    if argv[:1] == ["decoder"]:
        return decoder.main(argv[1:])
    if argv[:1] == ["attention"]:
        from app.bench import attention  # imported on use: the other benchmarks do not need it

        return attention.main(argv[1:])
    return offline.main(argv)


if __name__ == "__main__":
    sys.exit(main())
