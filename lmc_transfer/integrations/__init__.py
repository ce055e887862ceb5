"""Bridges to inference engines (SGLang); each module imports its engine lazily."""
