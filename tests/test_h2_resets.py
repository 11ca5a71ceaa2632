"""The rapid-reset rule on its own: which resets are premature, and when a connection
has made too many of them."""

from gateway._h2_resets import PREMATURE_S, PrematureResets


def open_and_reset(resets: PrematureResets, first_id: int, count: int, at: float = 0.0) -> int:
    for stream_id in range(first_id, first_id + 2 * count, 2):
        resets.opened(stream_id, at)
        resets.reset_by_client(stream_id, at + 0.001)
    return first_id + 2 * count


def test_a_connection_is_cut_at_the_limit_of_resets_made_at_once() -> None:
    resets = PrematureResets(limit=100)
    next_id = open_and_reset(resets, 1, 99)
    assert not resets.exceeded()
    open_and_reset(resets, next_id, 1)
    assert resets.exceeded() and resets.premature == 100


def test_a_client_that_resets_less_than_half_its_streams_is_never_cut() -> None:
    resets = PrematureResets(limit=100)
    stream_id = 1
    for _ in range(400):  # two answered streams, then one reset at once
        for _ in range(2):
            resets.opened(stream_id, 0.0)
            resets.closed(stream_id)
            stream_id += 2
        stream_id = open_and_reset(resets, stream_id, 1)
        assert not resets.exceeded()
    assert resets.premature == 400 and resets.streams == 1200


def test_late_resets_and_resets_of_closed_streams_are_not_premature() -> None:
    resets = PrematureResets(limit=1)
    resets.opened(1, 0.0)
    resets.reset_by_client(1, PREMATURE_S)  # a long stream the client gave up on
    resets.opened(3, 0.0)
    resets.closed(3)
    resets.reset_by_client(3, 0.001)  # already answered: nothing was wasted
    resets.reset_by_client(5, 0.001)  # never opened (idle stream)
    assert resets.premature == 0 and not resets.exceeded()
    assert resets.opened_at == {}


def test_limit_zero_never_cuts() -> None:
    resets = PrematureResets(limit=0)
    open_and_reset(resets, 1, 1000)
    assert resets.premature == 1000 and not resets.exceeded()
