"""Where each open stream can be found: by id, by node, by project and by label.

The hub routes a change through these indexes instead of walking every stream: a
`node:<id>` row goes to that node's streams, a selector row to the streams in the
smallest bucket of its terms (filtered by the whole selector).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from controlplane.domain.kernel.labels import Selector
from controlplane.watch.stream import WatchStream


class StreamIndex:
    def __init__(self) -> None:
        self.by_id: dict[str, WatchStream] = {}
        self._by_node: dict[str, set[WatchStream]] = {}
        self._by_project: dict[str, set[WatchStream]] = {}
        self._by_label: dict[tuple[str, str, str], set[WatchStream]] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[WatchStream]:
        return iter(list(self.by_id.values()))

    def add(self, stream: WatchStream) -> None:
        self.by_id[stream.stream_id] = stream
        self._by_node.setdefault(stream.node_id, set()).add(stream)
        self._by_project.setdefault(stream.project, set()).add(stream)
        self._index_labels(stream)

    def remove(self, stream: WatchStream) -> bool:
        """Forget `stream`; False if it was not indexed."""
        if self.by_id.pop(stream.stream_id, None) is None:
            return False
        self._by_node[stream.node_id].discard(stream)
        if not self._by_node[stream.node_id]:
            del self._by_node[stream.node_id]
        self._by_project[stream.project].discard(stream)
        self._unindex_labels(stream)
        return True

    def relabel(self, stream: WatchStream, labels: dict[str, str]) -> None:
        self._unindex_labels(stream)
        stream.labels = labels
        self._index_labels(stream)

    def of_node(self, node_id: str) -> list[WatchStream]:
        return list(self._by_node.get(node_id, ()))

    def matching(self, project: str, selector: Selector) -> Iterable[WatchStream]:
        """Every stream of `project` whose labels match `selector`."""
        if not selector.terms:
            return list(self._by_project.get(project, ()))
        buckets = [self._by_label.get((project, k, v), set()) for k, v in selector.terms]
        smallest = min(buckets, key=len)
        if len(buckets) == 1:
            return list(smallest)  # the bucket is exactly the selector's matches
        return [s for s in smallest if selector.matches(s.labels)]

    def _index_labels(self, stream: WatchStream) -> None:
        for k, v in stream.labels.items():
            self._by_label.setdefault((stream.project, k, v), set()).add(stream)

    def _unindex_labels(self, stream: WatchStream) -> None:
        for k, v in stream.labels.items():
            bucket = self._by_label.get((stream.project, k, v))
            if bucket is not None:
                bucket.discard(stream)
                if not bucket:
                    del self._by_label[(stream.project, k, v)]
