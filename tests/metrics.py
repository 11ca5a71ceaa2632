"""Read Prometheus text the way a scrape does, for assertions on counters."""

import re

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\} (?P<value>\S+)$")


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (values may hold
    braces, e.g. route templates)."""
    total = 0.0
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and match["name"] == name and all(
                f'{key}="{value}"' in match["labels"] for key, value in labels.items()):
            total += float(match["value"])
    return total
