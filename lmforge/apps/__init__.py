"""Applications built on the library: the customer-service assistant (``support``) and the
text-based recommender (``recommend``); each is a command group and a ``serve`` extension."""
