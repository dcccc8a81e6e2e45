"""Partial mesh: a HyParView overlay (:mod:`.hyparview`) carrying Plumtree
broadcast trees (:mod:`.plumtree`), combined in :class:`.mesh.Mesh`.
Inputs, outputs and the link contract: :mod:`.events`."""
