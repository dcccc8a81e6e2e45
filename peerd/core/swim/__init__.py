"""SWIM failure detection with the Lifeguard refinements (pure formulas and state)."""
