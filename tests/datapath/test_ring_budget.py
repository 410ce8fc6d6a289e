"""RingBuffer.consume(limit): the agent's bounded read of new-tuple events."""

from __future__ import annotations

from . import model
from .rig import Rig


def test_consume_takes_at_most_the_limit_and_leaves_the_rest(rig: Rig) -> None:
    for port in range(10):
        frame = model.build_frame(model.ENCAPS["none"],
                                  model.l3_packet(4, "udp", sport=20000 + port))
        rig.run(model.XDP, frame)
    assert rig.ring.consume(3) == 3
    assert len(rig.events) == 3
    assert rig.ring.consume(0) == 7
    assert sorted(k.sport for k in rig.events) == list(range(20000, 20010))
    assert rig.ring.consume(5) == 0
