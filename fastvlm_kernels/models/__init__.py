"""Models shipped with the package: ``models.tiny``, the embedded tiny VLM."""
