"""Moving loan collateral: the PSBTs that release or liquidate it.

Kept apart from `custody.bitcoin` (addresses, keys, descriptors) because this is where money
leaves the escrow. A signing request is a PSBT built for an action, the two seats that must sign
it, the signatures collected, and its way to the chain:
awaiting_signatures -> ready -> broadcast -> confirmed (or cancelled; or replaced when an RBF
sibling confirms). Every step is an audit event in the same transaction.

One module a concern: `rules` (seats, who asks, loan states), `chain` (what the node must
answer), `repository` (reads), `building` (requests and fee bumps), `signatures` (uploads),
`broadcast`, `cancel`, `approvals` (the bank's signature), `chain_events` (the watcher's
callbacks), `psbt` (the PSBT itself).
"""
