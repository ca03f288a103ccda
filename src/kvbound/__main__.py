from kvbound.cli import app

app(prog_name="kvbound")
