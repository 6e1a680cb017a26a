"""``lscale top``: a live terminal dashboard of a λScale cluster.

``state`` is the pure model (messages in, rows out), ``render`` turns rows into rich
renderables, ``app`` is the asyncio shell that subscribes to NATS and drives the screen.
"""
