"""A stand-in for ``piper_ds.balance.mover.migrate_experts`` in the balance tests: it rewrites the layers'
placement (in place, as the dispatcher holds the placement object) and moves no parameter or optimizer state.
The controller's tests use it to check what the controller asks for, independently of the mover."""
from dataclasses import dataclass

#: Bytes the fake reports per expert a rank sends (so that the controller's sums can be checked).
FAKE_BYTES_PER_EXPERT = 1000


@dataclass
class FakeMigrationReport:
    experts_moved: int
    bytes_sent: int
    seconds: float


CALLS = []  # (moves) of every call in this process


def fake_migrate_experts(engine, moves):
    """Swaps ``rank_of`` and ``slot_of`` of each pair in ``engine.piper_moe_layers[i].placement``; reports
    FAKE_BYTES_PER_EXPERT per expert this rank held before the swap."""
    CALLS.append({i: list(p) for i, p in moves.items()})
    moved = sent = 0
    for i, pairs in moves.items():
        layer = engine.piper_moe_layers[i]
        placement = layer.placement
        for a, b in pairs:
            if int(placement.rank_of[a]) == int(placement.rank_of[b]):
                raise ValueError(f"experts {a} and {b} of layer {i} are on the same EP rank")
            sent += sum(int(placement.rank_of[e]) == layer.ep_rank for e in (a, b))
            for t in (placement.rank_of, placement.slot_of):
                t[[a, b]] = t[[b, a]]
            moved += 2
    return FakeMigrationReport(moved, FAKE_BYTES_PER_EXPERT * sent, 0.001)


def install() -> None:
    """Makes the balance controller call this fake for the rest of the current process (a spawned worker; in the
    test process itself use ``monkeypatch.setattr(controller, "migrate_experts", fake_migrate_experts)``)."""
    from piper_ds.balance import controller
    controller.migrate_experts = fake_migrate_experts
