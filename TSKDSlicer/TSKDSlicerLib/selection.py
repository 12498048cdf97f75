"""The segment list of the module panel, computed from the *current* selection (plain Python).

The list used to be rebuilt from a selector's ``currentNodeChanged`` signal, which Qt delivers
before the parameter node is updated, so it showed (and Train used) the segments of the
previously selected volume/segmentation. The widget now rebuilds it when the parameter node
changes, and this class decides when that is needed and what the rows are: node identity (not
segment ids such as ``Segment_1``, which every segmentation has) decides what is stale, and
check marks are remembered per segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SegmentRow:
    segment_id: str
    name: str
    labelled_slices: int
    checked: bool

    @property
    def text(self) -> str:
        return f"{self.name}  ({self.labelled_slices} labelled slices)"


class SegmentSelection:
    """Tracks the (volume, segmentation) pair the list was built for."""

    def __init__(self):
        self._key = None
        self._checked: dict[str, set] = {}  # segmentation node ID -> unchecked segment ids

    @staticmethod
    def key(volumeNode, segmentationNode):
        def nid(node):
            return node.GetID() if node is not None else None
        seg_mtime = segmentationNode.GetSegmentation().GetMTime() if segmentationNode is not None else None
        return (nid(volumeNode), nid(segmentationNode), seg_mtime)

    def needs_update(self, volumeNode, segmentationNode) -> bool:
        """True when the pair (or the segments) differ from the ones the list shows."""
        return self.key(volumeNode, segmentationNode) != self._key

    def remember_checks(self, segmentationNode, checked_ids, all_ids) -> None:
        """Store which segments the user unchecked in ``segmentationNode``."""
        if segmentationNode is not None:
            self._checked[segmentationNode.GetID()] = set(all_ids) - set(checked_ids)

    def rows(self, volumeNode, segmentationNode, counts: dict) -> list[SegmentRow]:
        """Rows for ``segmentationNode`` only (all checked unless the user unchecked them in
        *this* segmentation); ``counts``: ``{segment id: labelled slices}`` of this pair."""
        self._key = self.key(volumeNode, segmentationNode)
        if segmentationNode is None:
            return []
        unchecked = self._checked.get(segmentationNode.GetID(), set())
        seg = segmentationNode.GetSegmentation()
        out = []
        for n in range(seg.GetNumberOfSegments()):
            sid = seg.GetNthSegmentID(n)
            out.append(SegmentRow(sid, seg.GetSegment(sid).GetName(), int(counts.get(sid, 0)),
                                  sid not in unchecked))
        return out

    @staticmethod
    def valid_ids(segmentationNode, ids) -> list[str]:
        """``ids`` that exist in ``segmentationNode`` (train never uses another node's ids)."""
        if segmentationNode is None:
            return []
        seg = segmentationNode.GetSegmentation()
        return [sid for sid in ids if seg.GetSegment(sid) is not None]
