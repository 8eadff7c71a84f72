"""Reports an auditor and the AML officer file (issue 15): the collateral register at any
moment (CSV, XLSX) and a loan's statement (PDF), replayed from the audit log."""
