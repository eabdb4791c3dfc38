"""Queue declarations are checked where they are written, without a database."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sqlalchemy_pgque import InvalidName, Queue


def test_settings_are_normalized_to_the_text_pgque_receives() -> None:
    queue = Queue("orders", config={
        "queue_ticker_max_lag": timedelta(milliseconds=500),
        "ticker_paused": True,
        "max_retries": 3,
        "rotation_period": "2 hours",
    })
    assert queue.config == {
        "ticker_max_lag": "0.5 seconds",
        "ticker_paused": "true",
        "max_retries": "3",
        "rotation_period": "2 hours",
    }


@pytest.mark.parametrize(("config", "message"), [
    ({"tick_speed": 1}, r"queue 'orders': unknown PgQue queue parameter 'tick_speed'"),
    ({"ticker_max_lag": "soon"}, r"ticker_max_lag='soon' is not a valid interval"),
    ({"max_retries": "three"}, r"max_retries='three' is not a valid integer"),
    ({"ticker_paused": "maybe"}, r"ticker_paused='maybe' is not a valid boolean"),
    ({"max_retries": None}, r"max_retries=None is not a setting"),
])
def test_a_bad_setting_fails_the_declaration(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Queue("orders", config=config)  # type: ignore[arg-type]


def test_invalid_names() -> None:
    for bad in ["", "q" * 58, 42]:
        with pytest.raises(InvalidName):
            Queue(bad)  # type: ignore[arg-type]
    assert Queue("q" * 57).name == "q" * 57
    with pytest.raises(InvalidName):
        Queue("ok", consumers=[""])
