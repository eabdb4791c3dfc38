"""A small orders app: an Order table, a Shipment table, and an ``orders`` queue.

Placing an order sends ``order.created`` in the same transaction (the outbox); the
``shipping`` consumer creates the shipment in the same transaction as the batch ack.
"""
