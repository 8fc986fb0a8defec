"""OREPA's kernel operators; :mod:`mmorepa.ops.extension` loads their optional C++ extension."""
