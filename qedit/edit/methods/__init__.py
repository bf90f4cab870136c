"""Edit methods: ROME, MEMIT, AlphaEdit and FT, each one module registered under its `EditMethod`."""
