"""Applications built on the library: the customer-service assistant (``support``)."""
