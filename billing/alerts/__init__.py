"""Budget alerts: the channels they go to and the durable outbox that delivers them.

- `channels`: validation of a budget's channels (webhook, Slack, email), including the
  refusal of loopback and private targets, and what the API shows of a channel.
- `messages`: the body of an alert on each channel, and the webhook signature.
- `senders`: one HTTP POST or one email, with the send-time address check.
- `outbox`: the durable outbox, its design and its public names: `enqueue` and
  `deliveries_for` (`store`: the rows, written with their alert, and shown) and
  `Deliverer` (`deliverer`: claims due rows under a lease, sends, retries with backoff,
  records the outcome).

Nothing here imports `metering`: the app wires the Deliverer to its settings, its
sessions and its metrics.
"""
