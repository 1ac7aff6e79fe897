// Publishes one dial job the way docs/jobs-and-events.md asks: to the jobs exchange
// (<prefix>.jobs, routing key "dial"), persistent, on a confirm channel, so the job is in
// RabbitMQ once this exits 0.
//
//   DIALER_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f DIALER_PREFIX=dialer \
//     node producer.js JOB_ID AGENT_EMAIL PHONE_NUMBER
'use strict';
const amqp = require('amqplib');

const url = process.env.DIALER_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const prefix = process.env.DIALER_PREFIX || 'dialer';
const [jobId, agentEmail, phoneNumber] = process.argv.slice(2);

async function main() {
  const connection = await amqp.connect(url);
  const channel = await connection.createConfirmChannel();
  let returned = false; // mandatory: no queue bound (wrong prefix?) comes back here
  channel.on('return', () => { returned = true; });
  const job = { jobId, agentEmail, phoneNumber, attributes: { crmRecord: jobId } };
  channel.publish(`${prefix}.jobs`, 'dial', Buffer.from(JSON.stringify(job)), {
    persistent: true,
    contentType: 'application/json',
    messageId: jobId,
    correlationId: `crm-${jobId}`,
    timestamp: Math.floor(Date.now() / 1000),
    headers: { timestamp_in_ms: Date.now() }, // creation time in ms: the queue-wait metric starts here
    mandatory: true,
  });
  await channel.waitForConfirms(); // rejects if the broker nacked
  await connection.close();
  if (returned) throw new Error(`job ${jobId} was not routed to any queue`);
  console.error(`published ${jobId}`);
}

main().catch((error) => { console.error(error.message); process.exit(1); });
