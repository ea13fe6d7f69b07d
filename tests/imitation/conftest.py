from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)
