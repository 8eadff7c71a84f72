"""AML screening of collateral: deposits' funding transactions and payout addresses,
through one provider interface (the bank's own lists, and optionally a commercial service
over HTTP); a deposit counts as collateral only once screened clear or cleared."""
