#!/usr/bin/env python3
"""Reads result events the way docs/jobs-and-events.md asks: a durable queue of our own bound
to <prefix>.replies with "dial.#", acknowledged after handling, de-duplicated by jobId, with
"duplicate" events ignored (they answer an extra message, not the job). Prints each job's
event once, as one JSON line, and exits after COUNT jobs (0: never).

    python3 consumer.py QUEUE [COUNT]
"""
import json
import os
import sys

import pika

url = os.environ.get("DIALER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
prefix = os.environ.get("DIALER_PREFIX", "dialer")
queue = sys.argv[1]
wanted = int(sys.argv[2]) if len(sys.argv) > 2 else 0

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue, durable=True)
channel.queue_bind(queue=queue, exchange=f"{prefix}.replies", routing_key="dial.#")
channel.basic_qos(prefetch_count=32)
print(f"listening on {queue}", file=sys.stderr, flush=True)

outcomes = {}  # jobId -> outcome; a real CRM keeps this in its database
for method, properties, body in channel.consume(queue, inactivity_timeout=60):
    if method is None:
        sys.exit(f"no event within 60 s ({len(outcomes)} of {wanted} jobs seen)")
    event = json.loads(body)
    if event["outcome"] != "duplicate" and event["jobId"] not in outcomes:
        outcomes[event["jobId"]] = event["outcome"]
        print(json.dumps(event), flush=True)
    channel.basic_ack(method.delivery_tag)
    if wanted and len(outcomes) >= wanted:
        break
channel.cancel()
connection.close()
