"""Bitcoin primitives for the custody service: keys, the collateral descriptor,
addresses and wallet exports. Pure functions over bdkpython and embit: no I/O."""
