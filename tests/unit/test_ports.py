"""Free ports come from below the ephemeral range, so nothing takes them before the server binds them."""

import socket

from mistral_ray.ports import _ephemeral_low, bindable, free_port


def test_free_ports_are_outside_the_ephemeral_range_distinct_and_free():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(20000 <= p < _ephemeral_low() for p in ports), ports
    assert all(bindable(p) for p in ports)


def test_a_port_in_use_is_not_bindable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        assert not bindable(s.getsockname()[1])
