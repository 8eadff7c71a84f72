"""Moving loan collateral: the PSBTs that release or liquidate it.

Kept apart from `custody.bitcoin` (addresses, keys, descriptors) because this is
where money leaves the escrow: building the unsigned transaction, checking every
signature a party uploads before it is kept, and finalising once the quorum is met.
"""
