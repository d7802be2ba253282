"""The baseline of the 4 KiB benchmark: bare Flask send_from_directory, no validation at all.
gunicorn -c sidecar/gunicorn.conf.py bench.bare_flask:app  (BENCH_FILES_DIR = the folder to serve)"""
import os

from flask import Flask, send_from_directory

app = Flask(__name__)
FILES = os.environ.get("BENCH_FILES_DIR", "/tmp")


@app.route("/files/<path:name>")
def files(name: str):
    return send_from_directory(FILES, name)
