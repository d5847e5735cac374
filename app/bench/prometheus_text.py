"""Reading a server's `/metrics`: Prometheus exposition text as samples keyed by (name, labels).

One reader for the benchmarks and the tests, so that both see a sample the same way: counters by their
exposed names (`var_requests_total`, with `_created` beside them), histograms by their `_bucket`, `_sum` and
`_count` samples, labels as a frozen set of (label, value) pairs.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]
NO_LABELS: Labels = frozenset()


def parse(text: str) -> Samples:
    """Every sample of the exposition `text`, in the order exposed."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str, timeout_s: float = 10) -> Samples:
    """GET `url` (a full /metrics address) and parse it; raises for a status other than 2xx."""
    r = httpx.get(url, timeout=timeout_s)
    r.raise_for_status()
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0.0 when absent (a labelled child appears only once used)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include these (any other labels summed over)."""
    wanted = frozenset(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples named `name`, by the value of their `label` (samples without it left out)."""
    found = {}
    for (n, ls), v in samples.items():
        if n == name and (key := dict(ls).get(label)) is not None:
            found[key] = v
    return found


def labels_of(samples: Samples, name: str) -> dict[str, str] | None:
    """The labels of the first sample named `name` (an info metric's payload), None when there is none."""
    return next((dict(ls) for n, ls in samples if n == name), None)


def first(samples: Samples, name: str) -> float | None:
    """The value of the first sample named `name` (an unlabelled gauge or counter), None when there is none."""
    return next((v for (n, _), v in samples.items() if n == name), None)
