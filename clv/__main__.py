from clv.cli import app

app()
