#!/usr/bin/env python3
"""Publishes one dial job the way docs/jobs-and-events.md asks: to the jobs exchange
(<prefix>.jobs, routing key "dial"), persistent, with publisher confirms, so the job is in
RabbitMQ once this returns.

    DIALER_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f DIALER_PREFIX=dialer \
        python3 producer.py JOB_ID AGENT_EMAIL PHONE_NUMBER
"""
import json
import os
import sys
import time

import pika

url = os.environ.get("DIALER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
prefix = os.environ.get("DIALER_PREFIX", "dialer")
job_id, agent_email, phone_number = sys.argv[1:4]

job = {"jobId": job_id, "agentEmail": agent_email, "phoneNumber": phone_number,
       "attributes": {"crmRecord": job_id}}

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.confirm_delivery()  # basic_publish now waits for the broker's ack (and raises on nack)
try:
    channel.basic_publish(
        exchange=f"{prefix}.jobs",
        routing_key="dial",
        body=json.dumps(job).encode("utf-8"),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,  # persistent
            message_id=job_id,
            correlation_id=f"crm-{job_id}",
            timestamp=int(time.time()),
            # Creation time in ms: the worker measures the queue wait from it.
            headers={"timestamp_in_ms": int(time.time() * 1000)},
        ),
        mandatory=True,  # no queue bound (wrong prefix?) is an error, not a silent drop
    )
except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
    sys.exit(f"job {job_id} was not taken by the broker: {error!r}")
print(f"published {job_id}", file=sys.stderr)
connection.close()
