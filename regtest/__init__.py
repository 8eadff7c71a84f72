"""The test kit: regtest node, PostgreSQL and SoftHSM2 harnesses, software keys, the demo.

Used from the source tree only (pytest and `python -m regtest.demo` run from the repository
root): it is in no wheel and no image of the product (tests/test_packaging.py checks).
"""
