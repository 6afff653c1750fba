"""Knowledge editors (ROME, MEMIT) behind one interface, their statistics and the sequential editing driver."""
