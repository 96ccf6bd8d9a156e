"""The edge service's routes, one module per concern, each a ``ROUTES`` list.

:func:`edge.serving.app.create_app` mounts them.
"""
