"""A small demo shop for Backout: orders, payments and inventory on Kafka.

- `examples.shop.schemas`: payload models (`OrderPlaced` v1 and v2, ...),
  commands, confirmation events and topic names (`ShopTopics`).
- `examples.shop.flow`: the envelopes one checkout emits, as plain data.
- `examples.shop.saga`: the `checkout` saga (`BACKOUT_SAGAS=examples.shop.saga`).
- `examples.shop.services`: the three services (aiokafka) and `Shop`, which
  drives the forward flow; `python -m examples.shop.services --help`.
"""
