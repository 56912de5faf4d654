from tests.tasks.conftest import tiny_decoder_dir, tiny_encoder_dir  # noqa: F401  (shared fixtures)
