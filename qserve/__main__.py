from qserve.cli import app

app(prog_name="qserve")
