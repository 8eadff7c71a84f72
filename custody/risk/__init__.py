"""Risk engine: BTC/RUB prices, loan-to-value and when automatic liquidation may act.

Kept apart from the loan lifecycle so the rules that can sell a client's collateral
are small, pure where possible, and tested on their own.
"""
