"""compliance: who a miner is, the evidence, the compliance officers' reviews and the gate."""
