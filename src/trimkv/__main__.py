from trimkv.cli import app

app(prog_name="trimkv")
