"""One scaling measurement inside a node's network namespace (the scaling section runs it with
``nsenter --net=/run/netns/NODE``): the scheduler and the bench's client there, the workers spread
over the nodes given. Argument: a JSON object of ``ready.schedfile_cluster``'s keyword arguments
(``tmp`` a path); prints its result as one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ready
from common import HPCDASK, pickle_by_value
from ready import schedfile_cluster

pickle_by_value(ready)  # its functions run on the scheduler, which cannot import the bench


def main(argv: list[str]) -> None:
    kw = json.loads(argv[1])
    kw["tmp"] = Path(kw["tmp"])
    print(json.dumps(schedfile_cluster([HPCDASK], **kw)), flush=True)


if __name__ == "__main__":
    main(sys.argv)
