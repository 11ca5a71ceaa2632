"""What ``python -m gateway demo`` tells the user to try."""

from gateway._demo import url_of
from gateway._server import listen_socket


def test_the_demo_announces_the_port_it_bound_not_the_one_asked_for() -> None:
    """``demo --bind 127.0.0.1:0`` printed ``http://127.0.0.1:0``, a URL nothing listens
    on; a wildcard bind printed a URL curl cannot use."""
    for bind, host in (("127.0.0.1:0", "127.0.0.1"), (":0", "127.0.0.1"),
                       ("0.0.0.0:0", "127.0.0.1")):
        with listen_socket(bind) as sock:
            port = sock.getsockname()[1]
            assert port != 0
            assert url_of(sock) == f"http://{host}:{port}"
