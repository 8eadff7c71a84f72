"""The service's side of the bank's signer: statements to sign, relayed and applied."""
