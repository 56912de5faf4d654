from tests.tasks.conftest import tiny_encoder_dir  # noqa: F401  (shared fixture)
