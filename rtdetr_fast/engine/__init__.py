"""Training and evaluation loops (import the submodules: engine.evaluate, engine.train)."""
