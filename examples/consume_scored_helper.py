"""Consume scored events from legacy-gateway with the helper ``gateway.consumer``.

    pip install legacy-gateway        # or, in a checkout: pip install -e .
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F GATEWAY_PREFIX=gateway QUEUE=fraud-desk.scored \\
        python examples/consume_scored_helper.py

Stops on Ctrl-C / SIGTERM (in-flight handlers finish and are acked first), or after
``MAX_MESSAGES`` scored events when that is set. The queue stays (it is yours, durable): delete a
trial queue and its ``<queue>.dead`` / ``<queue>.dlx`` when you are done.
"""

from __future__ import annotations

import logging
import os
import threading

from gateway.consumer import Delivery, ScoredEvent, ScoredEventConsumer

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PREFIX = os.environ.get("GATEWAY_PREFIX", "gateway")  # bus.prefix of the gateway
QUEUE = os.environ.get("QUEUE", "fraud-desk.scored")  # your queue, named after your application
MAX_MESSAGES = int(os.environ.get("MAX_MESSAGES", "0"))  # 0: run until stopped

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("pika").setLevel(logging.WARNING)  # pika logs every connection step at INFO

app = ScoredEventConsumer(AMQP_URL, queue=QUEUE, prefix=PREFIX, prefetch=100, workers=2, max_attempts=3)
handled = 0
lock = threading.Lock()


@app.on("com.acme.#")  # AMQP topic pattern on the *original* event type
def show(event: ScoredEvent) -> None:
    """Every com.acme.* scored event (both workers run this; keep it thread-safe)."""
    global handled
    print(
        f"{event.type} subject={event.subject} score={event.score:.3f} "
        f"model={event.model_name}/{event.model_version} original={event.original_id}"
    )
    with lock:
        handled += 1
        if MAX_MESSAGES and handled >= MAX_MESSAGES:
            app.stop()  # from a handler: returns at once, run() then stops gracefully


@app.on("com.acme.cards.#", min_score=0.99, idempotent=True)
def high_risk(event: ScoredEvent, delivery: Delivery) -> None:
    """About 1 % false alarms at 0.99 for the built-in model. ``idempotent`` skips repeats of an
    event id in this process; a real side effect keys a unique constraint on ``event.id`` too."""
    print(f"  HIGH RISK {event.data.get('account_no')} amount={event.data.get('amount')} "
          f"(delivery {delivery.delivery_count + 1})")
    # open a case, block the card, ... -- raise to retry (up to max_attempts), then <queue>.dead


if __name__ == "__main__":
    app.run()  # blocks until Ctrl-C / SIGTERM / app.stop()
