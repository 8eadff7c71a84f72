"""`python -m pledge_hwi`: the same as the `pledge-hwi` command."""

from pledge_hwi.cli import app

app(prog_name="pledge-hwi")
