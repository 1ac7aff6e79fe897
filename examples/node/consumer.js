// Reads result events the way docs/jobs-and-events.md asks: a durable queue of our own bound
// to <prefix>.replies with "dial.#", acknowledged after handling, de-duplicated by jobId, with
// "duplicate" events ignored (they answer an extra message, not the job). Prints each job's
// event once, as one JSON line, and exits after COUNT jobs (0: never).
//
//   node consumer.js QUEUE [COUNT]
'use strict';
const amqp = require('amqplib');

const url = process.env.DIALER_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const prefix = process.env.DIALER_PREFIX || 'dialer';
const queue = process.argv[2];
const wanted = Number(process.argv[3] || 0);

async function main() {
  const connection = await amqp.connect(url);
  const channel = await connection.createChannel();
  await channel.assertQueue(queue, { durable: true });
  await channel.bindQueue(queue, `${prefix}.replies`, 'dial.#');
  await channel.prefetch(32);
  const outcomes = new Map(); // jobId -> outcome; a real CRM keeps this in its database
  const timer = setTimeout(() => {
    console.error(`not all events within 60 s (${outcomes.size} of ${wanted} jobs seen)`);
    process.exit(1);
  }, 60_000);
  await channel.consume(queue, async (message) => {
    const event = JSON.parse(message.content.toString('utf8'));
    if (event.outcome !== 'duplicate' && !outcomes.has(event.jobId)) {
      outcomes.set(event.jobId, event.outcome);
      console.log(JSON.stringify(event));
    }
    channel.ack(message);
    if (wanted && outcomes.size >= wanted) {
      clearTimeout(timer);
      await connection.close();
    }
  });
  console.error(`listening on ${queue}`);
}

main().catch((error) => { console.error(error.message); process.exit(1); });
