"""The transport factory: the all-to-all an MoE config names, for one expert-parallel group.

It sits above both transports (:mod:`piper_ds.comm.alltoall`, :mod:`piper_ds.comm.hierarchical`), so neither
imports the other's module back.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from piper_ds.comm.alltoall import FlatAllToAll, Transport, group_size
from piper_ds.comm.hierarchical import HierarchicalAllToAll, spans_nodes


def make_transport(kind: str, group: Optional[dist.ProcessGroup], topology=None,
                   node_dedup: bool = False) -> Transport:
    """Builds the transport named by the MoE config: 'flat', 'hierarchical' or 'auto'.

    'auto' is hierarchical only when the group spans more than one node of ``topology``. ``node_dedup`` (the
    hierarchical transport's option) is refused with 'flat'; when 'auto' resolves to flat (one node: nothing
    crosses nodes) it has nothing to do.
    """
    if kind not in ("flat", "hierarchical", "auto"):
        raise ValueError(f"transport must be 'flat', 'hierarchical' or 'auto', got {kind!r}")
    if node_dedup and kind == "flat":
        raise ValueError(f"node_dedup ({node_dedup}) needs transport 'hierarchical' or 'auto', got {kind!r}")
    if kind == "flat" or group_size(group) == 1:
        return FlatAllToAll(group)
    if kind == "hierarchical" or spans_nodes(group, topology):
        return HierarchicalAllToAll(group, topology, node_dedup=node_dedup)
    return FlatAllToAll(group)
