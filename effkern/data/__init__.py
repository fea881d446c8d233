"""Real data that ships inside installed packages (see DATA.md): text loaders and token blocks for LM flows."""
