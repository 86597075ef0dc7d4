"""Target backends (one module per format) and target profiles (YAML data)."""
