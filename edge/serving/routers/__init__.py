"""The edge service's routes, one router per concern; :func:`edge.serving.app.create_app` includes them."""
